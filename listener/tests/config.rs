//! The listener's config: every example in `deploy/` parses and is valid but for its TLS paths
//! (which name a real deployment's files), and mistakes are all reported at once, by field.

use std::path::Path;

use stillpoint_listener::Config;

fn parse(text: &str) -> Config {
    toml::from_str(text).unwrap_or_else(|e| panic!("parse: {e}"))
}

#[test]
fn every_listener_example_in_deploy_is_valid() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut seen = 0;
    for entry in std::fs::read_dir(&deploy).expect("deploy dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !(name.starts_with("listener") && name.ends_with(".toml")) {
            continue;
        }
        let config = parse(&std::fs::read_to_string(&path).expect("read example"));
        let problems: Vec<_> =
            config.problems().into_iter().filter(|p| !p.starts_with("tls.")).collect();
        assert!(problems.is_empty(), "{name}: {problems:?}");
        seen += 1;
    }
    assert!(seen > 0, "no listener example found in {}", deploy.display());
}

#[test]
fn mistakes_are_reported_together_naming_each_field() {
    let config = parse(
        r#"
data_dir = "/tmp/x"
listen = "127.0.0.1:0"
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/l.pem"
key = "/nonexistent/l.key"
[timeouts]
lease_ms = 3000
[[server]]
name = "a"
address = "127.0.0.1:1"
[[server]]
name = "a"
address = "nowhere"
[[group]]
name = "g"
servers = ["a", "zz"]
[copy]
mode = "command"
command = []
"#,
    );
    let problems = config.problems().join("\n");
    for expected in [
        "tls.ca: /nonexistent/ca.pem does not exist",
        "server.name: \"a\" is listed twice",
        "address \"nowhere\" must be host:port",
        "group g: server \"zz\" is not in the inventory",
        "leaves -1000ms to gather prepares",
        "copy.command: empty",
    ] {
        assert!(problems.contains(expected), "missing {expected:?} in:\n{problems}");
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = toml::from_str::<Config>("data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\nlisen = 1\n")
        .unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
}
