//! The manifest encoding: both formats read, format 2 written, damage named.

use super::*;

fn volume(size: u64, chunks: Vec<Option<ChunkId>>) -> Manifest {
    Manifest::Volume(VolumeManifest {
        meta: VolumeMeta { backup: "b1".into(), server: "srv-a".into(), volume: "data".into() },
        size,
        chunk_size: 4096,
        chunks: ChunkList::Flat(chunks),
        created_unix_ms: 1_700_000_000_000,
    })
}

fn id(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

/// A format 1 file's plaintext, as earlier versions wrote it: the whole manifest as JSON in one
/// zstd frame.
fn format1(m: &Manifest) -> Vec<u8> {
    zstd::bulk::compress(&serde_json::to_vec(m).expect("serializes"), 3).expect("compresses")
}

#[test]
fn a_volume_manifest_round_trips_with_holes_and_a_short_last_chunk() {
    // 19 chunks, the last one 100 bytes: holes at both ends and in the middle, and a bitmap
    // that does not fill its last byte.
    let mut chunks: Vec<Option<ChunkId>> = (0..19).map(|i| Some(id(i))).collect();
    for hole in [0, 7, 8, 9, 18] {
        chunks[hole] = None;
    }
    let m = volume(18 * 4096 + 100, chunks);
    let plain = encode_manifest(&m, Vec::new());
    assert_eq!(decode_manifest(&plain).expect("decodes"), m);
    let Manifest::Volume(v) = &m else { unreachable!() };
    assert_eq!(
        decode_summary(&plain).expect("summary"),
        ManifestSummary::Volume(VolumeSummary {
            meta: v.meta.clone(),
            size: v.size,
            chunk_size: v.chunk_size,
            created_unix_ms: v.created_unix_ms,
        })
    );
}

#[test]
fn the_chunk_list_is_binary_and_the_header_small() {
    let m = volume(10_000 * 4096, (0..10_000u32).map(|i| Some(id((i % 251) as u8))).collect());
    let plain = encode_manifest(&m, Vec::new());
    let (header, list) = split_header(&plain).expect("two frames");
    assert!(header.len() < 200, "header frame is {} bytes", header.len());
    let list = zstd::stream::decode_all(list).expect("list frame");
    assert_eq!(list.len(), 10_000usize.div_ceil(8) + 10_000 * 32);
}

#[test]
fn format_1_manifests_still_load() {
    let m = volume(3 * 4096, vec![Some(id(1)), None, Some(id(2))]);
    let plain = format1(&m);
    assert_eq!(decode_manifest(&plain).expect("decodes"), m);
    assert!(matches!(decode_summary(&plain), Ok(ManifestSummary::Volume(v)) if v.size == 3 * 4096));
    let b = Manifest::Backup(BackupManifest {
        backup: "b1".into(),
        volumes: vec![ManifestId([9; 32])],
        cut: serde_json::json!({"servers": ["srv-a"]}),
        created_unix_ms: 5,
        artifacts: Vec::new(),
    });
    assert_eq!(decode_manifest(&format1(&b)).expect("decodes"), b);
    assert_eq!(decode_manifest(&encode_manifest(&b, Vec::new())).expect("decodes"), b);
}

#[test]
fn a_backup_manifest_keeps_artifacts_as_base64_and_one_without_them_reads_as_none() {
    let artifact = BackupArtifact {
        server: "srv-a".into(),
        quiescer: "pg".into(),
        name: "backup_label".into(),
        bytes: vec![0, 1, 2, 0xff, b'\n'],
    };
    let b = Manifest::Backup(BackupManifest {
        backup: "b1".into(),
        volumes: vec![ManifestId([9; 32])],
        cut: serde_json::json!({}),
        created_unix_ms: 5,
        artifacts: vec![artifact.clone()],
    });
    let json = serde_json::to_value(&b).expect("serializes");
    assert_eq!(
        json["artifacts"],
        serde_json::json!([{"server": "srv-a", "quiescer": "pg", "name": "backup_label", "base64": "AAEC/wo="}])
    );
    assert_eq!(decode_manifest(&encode_manifest(&b, Vec::new())).expect("decodes"), b);
    // Written before artifacts existed: no field at all.
    let old = br#"{"kind":"backup","backup":"b0","volumes":[],"cut":null,"created_unix_ms":1}"#;
    let plain = zstd::bulk::compress(old, 3).expect("compresses");
    let Ok(Manifest::Backup(read)) = decode_manifest(&plain) else { panic!("an old manifest") };
    assert!(read.artifacts.is_empty());
}

#[test]
fn a_chunk_list_that_disagrees_with_the_size_is_damage() {
    // Three chunks listed for a volume of two.
    let plain =
        encode_manifest(&volume(2 * 4096, vec![Some(id(1)), None, Some(id(2))]), Vec::new());
    let err = decode_manifest(&plain).expect_err("refused");
    assert!(err.contains("3 chunks") && err.contains("makes 2"), "{err}");
    let plain = format1(&volume(2 * 4096, vec![Some(id(1)), None, Some(id(2))]));
    let err = decode_manifest(&plain).expect_err("refused");
    assert!(err.contains("lists 3 chunks"), "{err}");
}

#[test]
fn a_cut_or_padded_chunk_list_is_damage() {
    let m = volume(40 * 4096, (0..40).map(|i| Some(id(i))).collect());
    let plain = encode_manifest(&m, Vec::new());
    let (header, list) = split_header(&plain).expect("two frames");
    let raw = zstd::stream::decode_all(list).expect("list frame");

    let mut cut = header.to_vec();
    cut.extend(zstd::bulk::compress(&raw[..raw.len() - 5], 3).expect("compresses"));
    let err = decode_manifest(&cut).expect_err("refused");
    assert!(err.contains("cut short"), "{err}");

    let mut padded = header.to_vec();
    let mut more = raw.clone();
    more.push(0);
    padded.extend(zstd::bulk::compress(&more, 3).expect("compresses"));
    let err = decode_manifest(&padded).expect_err("refused");
    assert!(err.contains("after its last chunk"), "{err}");

    let err = decode_manifest(b"not zstd").expect_err("refused");
    assert!(err.contains("zstd frame"), "{err}");
}

#[test]
fn a_paged_volume_manifest_round_trips_and_lists_only_its_pages() {
    // 10 000 chunks in pages of 4096: three pages, the middle one all holes.
    let pages = vec![Some(id(1)), None, Some(id(3))];
    let m = Manifest::Volume(VolumeManifest {
        meta: VolumeMeta { backup: "b1".into(), server: "srv-a".into(), volume: "data".into() },
        size: 10_000 * 4096,
        chunk_size: 4096,
        chunks: ChunkList::Paged { page_chunks: 4096, pages },
        created_unix_ms: 1_700_000_000_000,
    });
    let plain = encode_manifest(&m, Vec::new());
    assert_eq!(decode_manifest(&plain).expect("decodes"), m);
    let (_, list) = split_header(&plain).expect("two frames");
    let list = zstd::stream::decode_all(list).expect("list frame");
    assert_eq!(list.len(), 1 + 2 * 32);
    assert!(matches!(decode_summary(&plain), Ok(ManifestSummary::Volume(_))));
}

#[test]
fn a_paged_manifest_whose_page_count_disagrees_is_damage() {
    let m = Manifest::Volume(VolumeManifest {
        meta: VolumeMeta { backup: "b1".into(), server: "srv-a".into(), volume: "data".into() },
        size: 10_000 * 4096,
        chunk_size: 4096,
        chunks: ChunkList::Paged { page_chunks: 4096, pages: vec![Some(id(1)), None] },
        created_unix_ms: 1_700_000_000_000,
    });
    let plain = encode_manifest(&m, Vec::new());
    let err = decode_manifest(&plain).unwrap_err();
    assert!(err.contains("lists 2 pages where 10000 chunks in pages of 4096 make 3"), "{err}");
}
