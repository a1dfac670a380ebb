//! The LVM provider's pure parts on the host: sizes, names, the command lines it builds, and
//! reports recorded from real `lvs`/`vgs` in the test VM (testdata/README.md says how).

use super::*;

fn vol(s: &str) -> Volume {
    Volume::parse(s).unwrap()
}

fn settings(size: &str, max_percent: f64) -> Settings {
    Settings {
        size: SnapshotSize::parse(size).unwrap(),
        max_percent,
        timeout: Duration::from_secs(1),
    }
}

#[test]
fn sizes_are_a_percentage_of_the_origin_or_binary_units_rounded_to_extents() {
    const MIB: u64 = 1 << 20;
    assert_eq!(SnapshotSize::parse("20%").unwrap(), SnapshotSize::Percent(20.0));
    assert_eq!(SnapshotSize::parse("512MiB").unwrap(), SnapshotSize::Bytes(512 * MIB));
    assert_eq!(SnapshotSize::parse("2G").unwrap(), SnapshotSize::Bytes(2 << 30));
    assert_eq!(SnapshotSize::parse("4096").unwrap(), SnapshotSize::Bytes(4096));
    for bad in ["", "%", "0%", "101%", "-5%", "12 parsecs", "0", "1.5G", "99999999999T"] {
        assert!(SnapshotSize::parse(bad).is_err(), "{bad:?}");
    }
    // 20% of 100 MiB is 20 MiB, rounded up to 4 MiB extents: 20 MiB.
    assert_eq!(SnapshotSize::Percent(20.0).bytes_for(100 * MIB, 4 * MIB), 20 * MIB);
    // 10% of 100 MiB is 10 MiB: three 4 MiB extents.
    assert_eq!(SnapshotSize::Percent(10.0).bytes_for(100 * MIB, 4 * MIB), 12 * MIB);
    assert_eq!(SnapshotSize::Bytes(1).bytes_for(100 * MIB, 4 * MIB), 4 * MIB);
    // Never more than a snapshot can use: lvcreate made 68 MiB of a 300 MiB request for a
    // 64 MiB origin in the VM ("maximum usable size").
    assert_eq!(SnapshotSize::Bytes(300 * MIB).bytes_for(64 * MIB, 4 * MIB), 68 * MIB);
    assert_eq!(SnapshotSize::Percent(100.0).bytes_for(256 * MIB, 4 * MIB), 256 * MIB);
}

#[test]
fn volumes_are_vg_slash_lv_in_lvms_own_characters() {
    assert_eq!(vol("vg0/data"), Volume { vg: "vg0".into(), lv: "data".into() });
    assert_eq!(vol("vg_1/d+b.x-y").to_string(), "vg_1/d+b.x-y");
    for bad in ["data", "/dev/vg0/data", "vg0/", "/data", "vg0/a/b", "vg0/-x", "vg 0/x", "vg0/.."] {
        let e = Volume::parse(bad).unwrap_err().to_string();
        assert!(e.contains("vg0/data") || e.contains("LVM names"), "{bad}: {e}");
    }
}

#[test]
fn snapshot_names_map_the_backup_ids_colon_and_stay_distinct() {
    assert_eq!(
        snapshot_name("data", "20261202T210601Z-3fa9c1").unwrap(),
        "data.sp.20261202T210601Z-3fa9c1"
    );
    let a = snapshot_name("data", "b:1").unwrap();
    let b = snapshot_name("data", "b_1").unwrap();
    let c = snapshot_name("data", "b-1").unwrap();
    assert_eq!(a, "data.sp.b+1");
    assert!(a != b && b != c && a != c);
    assert!(lvm_name_ok(&a), "{a}");
    assert!(snapshot_name("data", "a/b").is_err());
    assert!(snapshot_name("data", ".x").is_err());
    let long = snapshot_name(&"x".repeat(60), &"y".repeat(60)).unwrap_err().to_string();
    assert!(long.contains("shorten the origin LV's name"), "{long}");
}

#[test]
fn command_lines_ask_for_json_in_bytes_and_tag_read_only_snapshots() {
    let vgs = vec!["vg0".to_string()];
    assert_eq!(
        lvs_args(&vgs).join(" "),
        "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_attr,lv_size,segtype,pool_lv,origin,lv_tags,data_percent,metadata_percent vg0"
    );
    assert_eq!(
        vgs_args(&vgs).join(" "),
        "vgs --reportformat json --units b --nosuffix -o vg_name,vg_free,vg_extent_size vg0"
    );
    let thick = lvcreate_args(
        &vol("vg0/thick"),
        "thick.sp.b+1",
        "b:1",
        &Plan::Thick { cow_bytes: 8 << 20 },
    );
    assert_eq!(
        thick.join(" "),
        "lvcreate --snapshot --size 8388608b --permission r --name thick.sp.b+1 --addtag stillpoint-backup:b:1 vg0/thick"
    );
    let thin =
        lvcreate_args(&vol("vg0/thin"), "thin.sp.b1", "b1", &Plan::Thin { pool: "pool".into() });
    assert_eq!(
        thin.join(" "),
        "lvcreate --snapshot --setactivationskip n --permission r --name thin.sp.b1 --addtag stillpoint-backup:b1 vg0/thin"
    );
}

#[test]
fn config_problems_name_each_field() {
    let cfg = LvmConfig {
        snapshot_size: "lots".into(),
        thin_pool_max_percent: 0.0,
        command_timeout_ms: 0,
    };
    let mut out = Vec::new();
    cfg.problems(&["vg0/a".into(), "nope".into(), "vg0/a".into()], &mut out);
    let text = out.join("\n");
    for want in [
        "snapshot.snapshot_size: \"lots\"",
        "snapshot.thin_pool_max_percent: 0",
        "snapshot.command_timeout_ms",
        "volumes[1]: \"nope\" is not a logical volume",
        "volumes[2]: vg0/a appears twice",
    ] {
        assert!(text.contains(want), "{want} in:\n{text}");
    }
    assert!(Lvm::new(&cfg, &["vg0/a".into()]).is_err());
}

const LVS: &str = include_str!("testdata/lvs-thick-thin.json");
const VGS: &str = include_str!("testdata/vgs.json");

/// The state `lvs` and `vgs` reported in the VM.
fn recorded() -> State {
    let vgs = parse_vgs(VGS).unwrap();
    State {
        lvs: parse_lvs(LVS).unwrap(),
        vgs: vgs.into_iter().map(|v| (v.vg_name.clone(), v)).collect(),
    }
}

#[test]
fn recorded_reports_parse_by_field_name() {
    let lvs = parse_lvs(LVS).unwrap();
    let names: Vec<_> = lvs.iter().map(|r| r.lv_name.as_str()).collect();
    assert_eq!(names, ["pool", "thick", "thick.sp.b+1", "thin", "thin.sp.b+1"]);
    let thin = &lvs[3];
    assert!(thin.is_thin() && thin.pool_lv == "pool" && thin.is_active());
    assert_eq!(thin.size().unwrap(), 96 << 20);
    assert_eq!(lvs[2].backup(), Some("b:1"));
    assert_eq!(lvs[1].backup(), None);
    assert_eq!(lvs[0].data_percent, "6.25");
    let vgs = parse_vgs(VGS).unwrap();
    assert_eq!(
        vgs,
        [VgRow {
            vg_name: "vg0".into(),
            vg_free: "843055104".into(),
            vg_extent_size: "4194304".into()
        }]
    );
    let bad = parse_lvs("{\"report\": [{\"lv\": [{\"lv_name\": 3}]}]}").unwrap_err();
    assert!(format!("{bad:#}").contains("parse lvs --reportformat json output"), "{bad:#}");
}

#[test]
fn the_kind_comes_from_lvs_thick_takes_its_size_from_the_vg_thin_uses_its_pool() {
    let s = recorded();
    let size = SnapshotSize::parse("20%").unwrap();
    // 20% of 64 MiB is 12.8 MiB: four 4 MiB extents.
    assert_eq!(s.plan(&vol("vg0/thick"), size).unwrap(), Plan::Thick { cow_bytes: 16 << 20 });
    assert_eq!(s.plan(&vol("vg0/thin"), size).unwrap(), Plan::Thin { pool: "pool".into() });
    for (v, why) in [
        ("vg0/thick.sp.b+1", "is itself a snapshot (of thick)"),
        ("vg0/thin.sp.b+1", "is itself a snapshot (of thin)"),
        ("vg0/pool", "is a thin pool"),
        ("vg0/nope", "vg0/nope: no such logical volume"),
    ] {
        let e = s.plan(&vol(v), size).unwrap_err().to_string();
        assert!(e.contains(why), "{v}: {e}");
    }
}

#[test]
fn the_budget_passes_with_room_and_names_every_shortfall_without_it() {
    let s = recorded();
    let both = [vol("vg0/thick"), vol("vg0/thin")];
    let ok = s.budget(&both, &settings("20%", 80.0)).unwrap();
    assert_eq!(
        ok,
        "vg0: thick snapshots need 16.0 MiB of 804.0 MiB free; thin pool vg0/pool data 6.2%, metadata 10.9% (limit 80%)"
    );
    // The request is capped at what a snapshot of a 64 MiB origin can use: 68 MiB.
    let capped = s.budget(&both, &settings("1000MiB", 80.0)).unwrap();
    assert!(capped.starts_with("vg0: thick snapshots need 68.0 MiB of 804.0 MiB free"), "{capped}");
    // The same volume group with 40 MiB free.
    let mut tight = recorded();
    tight.vgs.get_mut("vg0").unwrap().vg_free = (40u64 << 20).to_string();
    let big = tight.budget(&both, &settings("1000MiB", 80.0)).unwrap_err().to_string();
    assert!(
        big.contains(
            "volume group vg0 has 40.0 MiB free but the thick snapshots need 68.0 MiB (vg0/thick 68.0 MiB)"
        ) && big.contains("extend the volume group or lower snapshot.snapshot_size"),
        "{big}"
    );
    let full = s.budget(&both, &settings("20%", 5.0)).unwrap_err().to_string();
    assert!(
        full.contains("thin pool vg0/pool is above snapshot.thin_pool_max_percent (5%): data 6.2%, metadata 10.9%"),
        "{full}"
    );
    // Every problem at once.
    let all = s.budget(&[vol("vg0/nope"), vol("vg0/thin")], &settings("20%", 5.0)).unwrap_err();
    let all = all.to_string();
    assert!(
        all.contains("vg0/nope: no such logical volume") && all.contains("thin pool vg0/pool"),
        "{all}"
    );
}

#[test]
fn listing_finds_tagged_snapshots_with_their_origin_and_readable_size() {
    let lvs = parse_lvs(LVS).unwrap();
    let listed = listed(&lvs);
    let got: Vec<_> = listed
        .iter()
        .map(|(b, s)| {
            (b.as_str(), s.volume.as_str(), s.locator.as_str(), s.size_bytes, s.provider.as_str())
        })
        .collect();
    assert_eq!(
        got,
        [
            ("b:1", "vg0/thick", "/dev/vg0/thick.sp.b+1", 64 << 20, "lvm"),
            ("b:1", "vg0/thin", "/dev/vg0/thin.sp.b+1", 96 << 20, "lvm"),
        ]
    );
}

#[test]
fn the_deploy_example_is_a_valid_lvm_config_and_mistakes_are_named_by_field() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-lvm.example.toml");
    let config = crate::config::Config::load(&path).unwrap();
    let crate::config::SnapshotConfig::Lvm(lvm) = &config.snapshot else {
        panic!("{:?}", config.snapshot)
    };
    assert_eq!(lvm.snapshot_size, "20%");
    let problems: Vec<_> = config
        .problems()
        .into_iter()
        .filter(|p| p.starts_with("snapshot") || p.starts_with("volumes"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(Lvm::new(lvm, &config.volumes).is_ok());
    let text = std::fs::read_to_string(&path).unwrap();
    let unknown = text.replace("snapshot_size = ", "snapshot_sise = ");
    let e = crate::config::Config::parse(&unknown).unwrap_err();
    assert!(e.contains("snapshot_sise"), "{e}");
}
