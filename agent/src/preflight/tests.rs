//! The pre-flight's pure parts: which capabilities a config needs, reading them from
//! `/proc/self/status`, and mount points from `/proc/self/mountinfo`.

use std::path::Path;

use stillpoint_core::preflight::Level;

use super::*;

fn config(quiescers: &str, snapshot: &str) -> Config {
    Config::parse(&format!(
        "server = \"fs1\"\nlisten = \"127.0.0.1:1\"\nvolumes = [\"data\"]\n\
         tls = {{ ca = \"/a\", cert = \"/b\", key = \"/c\" }}\n{quiescers}\n[snapshot]\n{snapshot}\n"
    ))
    .unwrap()
}

fn caps(config: &Config) -> Vec<&'static str> {
    needed_caps(config).iter().map(|(c, _)| c.name()).collect()
}

#[test]
fn each_quiescer_and_provider_asks_for_the_capability_it_uses_and_no_more() {
    let mock = "provider = \"mock-san\"\narray = \"/srv/mock-san\"";
    assert_eq!(caps(&config("", mock)), ["CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"]);
    let fsfreeze = "[[quiescer]]\nkind = \"fsfreeze\"\nmount = \"/srv/data\"";
    assert_eq!(
        caps(&config(fsfreeze, mock)),
        ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"]
    );
    let stop = "[[quiescer]]\nkind = \"stop\"\nname = \"app\"\npidfile = \"/run/app.pid\"";
    assert_eq!(caps(&config(stop, mock)), ["CAP_KILL", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"]);
    let pg = "[[quiescer]]\nkind = \"postgres\"\nhost = \"/run/postgresql\"";
    assert_eq!(
        caps(&config(pg, "provider = \"btrfs\"\nsnapshot_dir = \"/srv/.snap\"")),
        ["CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"]
    );
}

#[test]
fn privileges_name_each_missing_capability_and_why() {
    let needed =
        vec![(Cap::SysAdmin, "fsfreeze /srv: FIFREEZE".to_string()), (Cap::Kill, "x".into())];
    let all = (1u64 << 21) | (1 << 5);
    let ok = privileges(&needed, Some(all), Some(0));
    assert_eq!(ok.level, Level::Ok, "{ok:?}");
    let missing = privileges(&needed, Some(1 << 5), Some(1000));
    assert_eq!(missing.level, Level::Error);
    assert!(
        missing.detail.starts_with("uid 1000 lacks CAP_SYS_ADMIN (fsfreeze /srv: FIFREEZE)"),
        "{}",
        missing.detail
    );
    assert!(!missing.detail.contains("CAP_KILL"), "{}", missing.detail);
    assert_eq!(privileges(&needed, None, Some(0)).level, Level::Warn);
}

#[test]
fn status_and_mountinfo_are_read_as_the_kernel_writes_them() {
    let status = "Name:\tstillpoint-agen\nUid:\t1000\t0\t0\t0\nCapEff:\t000001ffffffffff\n";
    assert_eq!(cap_eff(status), Some(0x1ff_ffff_ffff));
    assert_eq!(euid(status), Some(0));
    assert_eq!(cap_eff("Name: x\n"), None);
    let mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                     40 22 7:0 / /srv/my\\040data rw - xfs /dev/loop0 rw\n";
    assert!(is_mount_point(mountinfo, Path::new("/srv/my data")));
    assert!(is_mount_point(mountinfo, Path::new("/")));
    assert!(!is_mount_point(mountinfo, Path::new("/srv")));
}
