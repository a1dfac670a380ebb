//! `certs init` and `issue` into a temporary directory, and the refusals.

use super::*;

fn check(certs: Certs) -> Result<String> {
    let mut out = Vec::new();
    run(certs, &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn init_then_issue_then_refuse_a_second_init() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("certs");
    let init = || Certs::Init(InitArgs { dir: d.clone(), days: 30, json: false });
    let text = check(init()).unwrap();
    assert_eq!(
        text,
        format!("key: {}\nca: {}\n", d.join("ca.key").display(), d.join("ca.pem").display())
    );

    let issued = check(Certs::Issue(IssueArgs {
        dir: d.clone(),
        role: Role::Operator,
        name: "alice".into(),
        hosts: vec!["127.0.0.1".into()],
        days: 30,
        json: true,
    }))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&issued).unwrap();
    assert_eq!(v["cert"], d.join("alice.pem").display().to_string());
    assert_eq!(v["key"], d.join("alice.key").display().to_string());
    assert!(d.join("alice.pem").is_file() && d.join("alice.key").is_file());

    let err = check(init()).unwrap_err();
    assert_eq!(err.exit_code(), crate::EXIT_USAGE);
    assert!(err.to_string().contains("a CA already exists here"), "{err}");
}

#[test]
fn issue_refuses_bad_names_and_a_missing_ca() {
    let dir = tempfile::tempdir().unwrap();
    let issue = |name: &str| {
        check(Certs::Issue(IssueArgs {
            dir: dir.path().to_path_buf(),
            role: Role::Agent,
            name: name.into(),
            hosts: vec![],
            days: 30,
            json: false,
        }))
    };
    let err = issue("srv-a").unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");
    let err = issue("../evil").unwrap_err();
    assert!(err.to_string().contains("not a valid name"), "{err}");
}

#[test]
fn renew_keeps_role_and_names_and_check_warns_before_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    check(Certs::Init(InitArgs { dir: d.clone(), days: 3650, json: false })).unwrap();
    let issue = IssueArgs {
        dir: d.clone(),
        role: Role::Listener,
        name: "listener".into(),
        hosts: vec!["backup.clinic.lan".into(), "10.0.0.5".into()],
        days: 10,
        json: false,
    };
    check(Certs::Issue(issue)).unwrap();
    let old_key = std::fs::read(d.join("listener.key")).unwrap();

    let checked = || {
        run(Certs::Check(CheckArgs { dir: d.clone(), warn_days: 30, json: false }), &mut Vec::new())
    };
    let err = checked().unwrap_err();
    assert_eq!(err.exit_code(), crate::EXIT_BACKUP_FAILED);
    assert!(err.to_string().contains("listener.pem (9 days)"), "{err}");

    let text = check(Certs::Renew(RenewArgs {
        dir: d.clone(),
        name: "listener".into(),
        days: 825,
        json: false,
    }))
    .unwrap();
    assert!(text.starts_with("renewed listener:listener (was valid until "), "{text}");
    let new = inspect(&d.join("listener.pem")).unwrap();
    assert_eq!(new.role, Some(Role::Listener));
    assert_eq!(new.hosts, vec!["backup.clinic.lan".to_string(), "10.0.0.5".to_string()]);
    assert!(new.days_left(time::OffsetDateTime::now_utc()) >= 824);
    assert_ne!(std::fs::read(d.join("listener.key")).unwrap(), old_key, "a new key");
    assert_eq!(std::fs::read(d.join("listener.key.old")).unwrap(), old_key, "the old one kept");
    checked().unwrap();

    let err =
        check(Certs::Renew(RenewArgs { dir: d.clone(), name: "ca".into(), days: 10, json: false }))
            .unwrap_err();
    assert!(err.to_string().contains("no role"), "{err}");
}
