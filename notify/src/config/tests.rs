//! `[notify]` as people write it, and every mistake reported by field.

use std::time::Duration;

use super::*;

fn parse(text: &str) -> NotifyConfig {
    toml::from_str(text).expect("parses")
}

#[test]
fn periods_as_people_write_them() {
    assert_eq!("26h".parse::<Period>().unwrap().0, Duration::from_secs(26 * 3600));
    assert_eq!("1h 30m".parse::<Period>().unwrap().0, Duration::from_secs(5400));
    let e = "26 hours please".parse::<Period>().unwrap_err();
    assert!(e.contains("\"26 hours please\"") && e.contains("\"26h\""), "{e}");
    assert!("0s".parse::<Period>().unwrap_err().contains("longer than 0"));
}

#[test]
fn defaults_and_a_full_config() {
    let c = parse("");
    assert_eq!((c.on, c.tries, c.backoff.0), (On::Failure, 5, Duration::from_secs(2)));
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("pw");
    std::fs::write(&password, "pw\n").unwrap();
    let c = parse(&format!(
        r#"
        on = "both"
        [[email]]
        server = "smtp.example.com"
        user = "backup"
        password_file = "{}"
        from = "Backups <backup@example.com>"
        to = ["ops@example.com", "oncall@example.com"]
        [[webhook]]
        url = "https://chat.example.com/hooks/abc"
        timeout = "5s"
        "#,
        password.display()
    ));
    assert_eq!(c.on, On::Both);
    assert_eq!(c.email[0].port(), 587);
    assert_eq!(c.email[0].tls, TlsMode::Starttls);
    assert_eq!(c.webhook[0].timeout.0, Duration::from_secs(5));
    assert_eq!(c.problems(), Vec::<String>::new());
}

#[test]
fn every_problem_is_named_by_field() {
    let c = parse(
        r#"
        tries = 0
        [[email]]
        server = "smtp.example.com"
        tls = "none"
        user = "backup"
        password_file = "/nonexistent/pw"
        from = "not an address"
        to = []
        [[webhook]]
        url = "ftp://example.com/x"
        bearer_token_file = "/nonexistent/token"
        "#,
    );
    let problems = c.problems().join("\n");
    for needle in [
        "notify.tries: must be at least 1",
        "notify.email[0].from: \"not an address\"",
        "notify.email[0].to: no recipients",
        "notify.email[0].password_file: /nonexistent/pw",
        "notify.email[0].tls: \"none\" would send the password in clear",
        "notify.webhook[0].url: scheme \"ftp\" is not http or https",
        "notify.webhook[0].bearer_token_file: /nonexistent/token",
    ] {
        assert!(problems.contains(needle), "{needle:?} not in:\n{problems}");
    }
}

#[test]
fn unknown_fields_and_values_are_refused() {
    let e = toml::from_str::<NotifyConfig>("on = \"always\"").unwrap_err().to_string();
    assert!(e.contains("always"), "{e}");
    let e = toml::from_str::<NotifyConfig>("retries = 3").unwrap_err().to_string();
    assert!(e.contains("retries"), "{e}");
}
