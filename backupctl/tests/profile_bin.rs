//! The real binary reaching the real listener (in-process, scripted agents) with nothing but a
//! profile file: no flags, no per-shell environment variables.

use std::process::Command;

use stillpoint_listener::testing::{Cluster, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_file_is_all_a_shell_needs() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    let file = dir.path().join("backupctl.toml");
    let profiles = format!(
        "default = \"site\"\n[profile.site]\nlistener = \"{}\"\ncerts = \"{}\"\nidentity = \"operator\"\n\
         [profile.nobody]\nlistener = \"https://127.0.0.1:1\"\n",
        cluster.url(),
        cluster.certs.display()
    );
    std::fs::write(&file, profiles).unwrap();
    let certs = cluster.certs.clone();
    let backupctl = move |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_backupctl"));
        for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("STILLPOINT_")) {
            command.env_remove(var);
        }
        let out = command.env("STILLPOINT_CONFIG", &file).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let out = tokio::task::spawn_blocking(move || {
        (
            backupctl(&["agents"]),
            backupctl(&["config", "show"]),
            backupctl(&["--profile", "ghost", "agents"]),
            // A renewed certificate still authenticates.
            {
                let certs = certs.display().to_string();
                backupctl(&["certs", "renew", "--dir", &certs, "--name", "operator"])
            },
            backupctl(&["agents"]),
        )
    })
    .await
    .unwrap();
    let ((code, agents, err), (_, show, _), (ghost_code, _, ghost_err), renewed, again) = out;
    assert_eq!(renewed.0, Some(0), "{renewed:?}");
    assert_eq!(again.0, Some(0), "{again:?}");
    assert!(cluster.certs.join("operator.pem.old").is_file());
    assert_eq!(code, Some(0), "{agents}{err}");
    assert!(agents.lines().any(|l| l.starts_with("srv-a")), "{agents}");
    assert!(
        show.lines().any(|l| l.starts_with("listener ") && l.contains("profile site")),
        "{show}"
    );
    assert!(show.lines().any(|l| l.starts_with("timeout") && l.contains("default")), "{show}");
    assert_eq!(ghost_code, Some(2));
    assert!(ghost_err.contains("no profile \"ghost\" (it has: nobody, site)"), "{ghost_err}");
}
