//! The pure parts of LVM thin change tracking: names, identities from a real `lvs` report, and
//! the device-mapper lines it reads (recorded in the test VM, agent/tests/lvm_vm.rs).

use super::*;

/// `lvs -a --reportformat json --units b --nosuffix -o THIN_FIELDS vg0`, trimmed, from the VM.
const LVS: &str = r#"{"report": [{"lv": [
  {"lv_name":"base.x1", "vg_name":"vg0", "lv_uuid":"nbPH4j-QCRg-PItl-b4Q5-mlKe-BTYx-Uhl8m8", "segtype":"thin", "pool_lv":"p2", "thin_id":"3", "lv_time":"2026-12-04 21:56:44 +0000", "lv_size":"8388608", "lv_tags":""},
  {"lv_name":"[p2_tmeta]", "vg_name":"vg0", "lv_uuid":"Uy0wHp-SdZc-ViTQ-d8mx-owvf-D4wN-knTN4E", "segtype":"linear", "pool_lv":"", "thin_id":"", "lv_time":"2026-12-04 21:56:41 +0000", "lv_size":"4194304", "lv_tags":""},
  {"lv_name":"t1.sp.x1", "vg_name":"vg0", "lv_uuid":"vs2Wgg-T8o3-cfTz-efdX-dRw3-No4w-xLUu33", "segtype":"thin", "pool_lv":"p2", "thin_id":"2", "lv_time":"2026-12-04 21:56:43 +0000", "lv_size":"8388608", "lv_tags":"stillpoint-backup:x1"},
  {"lv_name":"thick", "vg_name":"vg0", "lv_uuid":"skTTiC-ZSKR-70ce-tzMv-vHWe-Izuu-AtBKXC", "segtype":"linear", "pool_lv":"", "thin_id":"", "lv_time":"2026-12-04 21:56:38 +0000", "lv_size":"67108864", "lv_tags":""}
]}]}"#;

#[test]
fn a_bases_identity_names_its_uuid_thin_id_pool_time_and_size() {
    let rows = parse_thin_rows(LVS).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows[0].identity(),
        "vg0/base.x1 uuid nbPH4j-QCRg-PItl-b4Q5-mlKe-BTYx-Uhl8m8 thin id 3 in pool p2 made 2026-12-04 21:56:44 +0000 size 8388608"
    );
    assert!(rows[0].is_thin() && !rows[3].is_thin());
    assert_eq!((rows[0].thin_id(), rows[2].size()), (Ok(3), Ok(8 << 20)));
    assert!(rows[3].thin_id().unwrap_err().contains("thin_id \"\" for vg0/thick"));
    assert!(parse_thin_rows("{\"report\": 1}").is_err());
}

#[test]
fn bases_are_named_by_origin_and_group_and_tagged_by_group() {
    assert_eq!(base_name("data", "nightly").unwrap(), "data.stillpoint.base.nightly");
    assert_eq!(base_name("data", "").unwrap(), "data.stillpoint.base");
    assert_eq!(base_tag("nightly"), "stillpoint-base:nightly");
    assert_eq!(base_tag(""), "stillpoint-base");
    // Never a backup's tag: the provider's list and delete go by that prefix.
    assert!(!base_tag("g").starts_with(TAG_PREFIX));
    assert!(base_name("data", "no/slash").is_err());
    let e = base_name(&"l".repeat(90), "group").unwrap_err();
    assert!(format!("{e:#}").contains("longer than LVM allows"), "{e:#}");
}

#[test]
fn device_mapper_names_double_each_hyphen() {
    assert_eq!(dm_name("vg0", "p2"), "vg0-p2");
    assert_eq!(dm_name("my-vg", "thin-pool"), "my--vg-thin--pool");
}

#[test]
fn a_thin_pool_table_gives_its_metadata_device_and_block_size() {
    assert_eq!(
        thin_pool_table("0 131072 thin-pool 253:7 253:8 128 0 0\n"),
        Ok(("253:7".to_string(), 65536))
    );
    assert_eq!(
        thin_pool_table("0 2097152 thin-pool 253:1 253:2 2048 1024 1 skip_block_zeroing"),
        Ok(("253:1".to_string(), 1 << 20))
    );
    for bad in [
        "0 131072 linear 253:7 0",
        "0 131072 thin-pool 253:7 253:8 0 0 0",
        "0 131072 thin-pool 253 253:8 128 0 0",
        "0 131072 thin-pool 253:7 253:8 99999999999999999999 0 0",
        "0 131072 thin-pool 253:7 253:8 128 0 0\n131072 4 linear 253:9 0",
        "",
    ] {
        assert!(thin_pool_table(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_thin_pool_status_gives_its_transaction() {
    // Recorded: `dmsetup status vg0-p2-tpool` with a metadata snapshot held (block 50).
    let status =
        "0 131072 thin-pool 4 114/1024 132/1024 50 rw discard_passdown queue_if_no_space - 256 \n";
    assert_eq!(transaction_id(status), Ok(4));
    assert!(transaction_id("0 131072 thin 5 7").is_err());
    assert!(transaction_id("0 131072 thin-pool x").is_err());
}
