//! Refusals carry structured details a client decodes with tonic-types instead of parsing the
//! message: the busy backup's id, the offending field, the unknown resource.

use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{refused, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_busy_backup_the_bad_field_and_the_unknown_resource() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    let mut client = cluster.client("operator");
    let busy = client.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;

    let status =
        refused(client.start_backup(start("g", "")).await, Code::FailedPrecondition, &busy);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("GROUP_BUSY", "stillpoint"));
    assert_eq!(info.metadata.get("backup_id"), Some(&busy));
    assert_eq!(info.metadata.get("group").map(String::as_str), Some("g"));
    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(resource.resource_type, "stillpoint.v1.Backup");
    assert_eq!(resource.resource_name, busy);

    let huge = "x".repeat(4096);
    let status = refused(
        client.get_backup(pb::GetBackupRequest { backup_id: huge }).await,
        Code::InvalidArgument,
        "backup_id",
    );
    assert!(status.message().len() < 400, "clipped: {}", status.message());
    let violations = status.get_details_bad_request().expect("BadRequest").field_violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "backup_id");
    assert!(violations[0].description.len() < 400, "{}", violations[0].description);

    let status =
        refused(client.start_backup(start("g", "a b")).await, Code::InvalidArgument, "request_id");
    let violations = status.get_details_bad_request().expect("BadRequest").field_violations;
    assert_eq!(violations[0].field, "request_id");
    assert!(violations[0].description.starts_with("\"a b\" is not a request id"));

    // A huge name is shown clipped, in the message and in the details (both travel in headers).
    let huge = start(&"g".repeat(1_000_000), "");
    let status = refused(client.start_backup(huge).await, Code::NotFound, "(1000000 bytes");
    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert!(resource.resource_name.len() < 200, "{}", resource.resource_name.len());

    let status = refused(client.start_backup(start("nope", "")).await, Code::NotFound, "nope");
    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(
        (resource.resource_type.as_str(), resource.resource_name.as_str()),
        ("group", "nope")
    );
    let missing = pb::GetBackupRequest { backup_id: "20200101T000000Z-000000".into() };
    let status = refused(client.get_backup(missing).await, Code::NotFound, "unknown backup");
    let resource = status.get_details_resource_info().expect("ResourceInfo");
    assert_eq!(resource.resource_name, "20200101T000000Z-000000");
}
