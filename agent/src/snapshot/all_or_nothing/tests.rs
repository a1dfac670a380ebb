//! All or nothing over the fake provider, which snapshots the first volume and then fails.

use super::*;
use crate::testing::{Calls, FakeProvider};

fn volumes() -> Vec<String> {
    vec!["data".into(), "logs".into()]
}

#[test]
fn a_create_failing_part_way_deletes_what_it_made_and_says_so() {
    let calls = Calls::default();
    let fake = FakeProvider::new(&calls);
    fake.fail_create(Some("array offline"));
    let provider = all_or_nothing(fake.clone());
    let err = provider.create("b1", &volumes()).unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "array offline; deleted the 1 snapshot(s) of this backup made before the failure"
    );
    assert!(fake.held().is_empty(), "{:?}", fake.held());
    assert_eq!(calls.all(), ["create b1", "delete b1"]);
}

#[test]
fn when_that_delete_fails_too_the_error_says_both_and_who_tries_again() {
    let calls = Calls::default();
    let fake = FakeProvider::new(&calls);
    fake.fail_create(Some("array offline"));
    fake.fail_delete(Some("array still offline"));
    let err = all_or_nothing(fake.clone()).create("b1", &volumes()).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.starts_with("array offline; deleting the snapshots made before the failure failed too (array still offline)"), "{text}");
    assert!(text.contains("the agent's Delete or the listener's sweep will try again"), "{text}");
}

#[test]
fn a_create_that_succeeds_is_untouched() {
    let calls = Calls::default();
    let fake = FakeProvider::new(&calls);
    let made = all_or_nothing(fake.clone()).create("b1", &volumes()).unwrap();
    assert_eq!(made.len(), 2);
    assert_eq!(calls.all(), ["create b1"]);
}

/// The wrapper must not hide a provider's check behind the trait's default (an LVM budget
/// refused before the freeze would otherwise pass unseen).
#[test]
fn the_providers_check_is_asked_through_the_wrapper() {
    struct Full;
    impl SnapshotProvider for Full {
        fn kind(&self) -> &'static str {
            "full"
        }
        fn check(&self, volumes: &[String]) -> anyhow::Result<String> {
            Err(anyhow!("no room for {}", volumes.join(",")))
        }
        fn create(&self, _: &str, _: &[String]) -> anyhow::Result<Vec<Snapshot>> {
            Ok(Vec::new())
        }
        fn delete(&self, _: &str) -> anyhow::Result<u32> {
            Ok(0)
        }
        fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
            Ok(Vec::new())
        }
    }
    let err = all_or_nothing(Arc::new(Full)).check(&volumes()).unwrap_err();
    assert_eq!(format!("{err:#}"), "no room for data,logs");
}
