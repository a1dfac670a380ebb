//! ListBackups a page at a time: the filters (group, states, creation time range) and the
//! cursor. Pages run newest first by `(created, id)`; a page token names the last backup of its
//! page (and the filters it was made for), so the next page starts strictly after it, and
//! backups created meanwhile, being newer, never shift or repeat what follows.

use crate::error::{Error, Result};
use crate::model::{BackupRecord, Millis, StateName};

/// Backups per page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;
/// The most backups one reply holds.
pub const MAX_PAGE: usize = 1000;

/// Which backups, and which page of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub filter: Filter,
    pub page_size: usize,
    /// The last backup of the previous page.
    pub after: Option<Cursor>,
}

/// Which backups a query lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub group: Option<String>,
    /// Empty: any state.
    pub states: Vec<StateName>,
    /// Created at or after.
    pub created_from: Option<Millis>,
    /// Created before.
    pub created_before: Option<Millis>,
}

/// A position in the newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created: Millis,
    pub id: String,
}

impl Filter {
    pub fn matches(&self, r: &BackupRecord) -> bool {
        self.group.as_ref().is_none_or(|g| *g == r.group)
            && (self.states.is_empty() || self.states.contains(&r.state.name()))
            && self.created_from.is_none_or(|t| r.created >= t)
            && self.created_before.is_none_or(|t| r.created < t)
    }

    /// The filter in a canonical text, bound into page tokens so a token is used only with the
    /// query that made it.
    fn fingerprint(&self) -> String {
        let mut states: Vec<String> = self.states.iter().map(ToString::to_string).collect();
        states.sort();
        states.dedup();
        format!(
            "{}/{}/{}/{}",
            self.group.as_deref().unwrap_or(""),
            states.join(","),
            self.created_from.map(|t| t.to_string()).unwrap_or_default(),
            self.created_before.map(|t| t.to_string()).unwrap_or_default()
        )
    }
}

impl Cursor {
    fn of(r: &BackupRecord) -> Cursor {
        Cursor { created: r.created, id: r.id.clone() }
    }

    /// Whether `r` comes after this position, newest first.
    fn precedes(&self, r: &BackupRecord) -> bool {
        (r.created, r.id.as_str()) < (self.created, self.id.as_str())
    }
}

/// Hex of `v1|created|id|filter`: opaque to callers, checked when it comes back.
pub fn token(cursor: &Cursor, filter: &Filter) -> String {
    let text = format!("v1|{}|{}|{}", cursor.created, cursor.id, filter.fingerprint());
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The cursor in a token from an earlier page of the same query.
pub fn parse_token(token: &str, filter: &Filter) -> Result<Cursor> {
    let bad = |why: &str| Error::InvalidArgument {
        field: "page_token",
        reason: format!(
            "{why}; pass next_page_token from the previous reply unchanged, with the same filters"
        ),
    };
    if !token.len().is_multiple_of(2) || token.len() > 2048 {
        return Err(bad("not a page token"));
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let text =
        bytes.and_then(|b| String::from_utf8(b).ok()).ok_or_else(|| bad("not a page token"))?;
    let mut parts = text.splitn(4, '|');
    let (Some("v1"), Some(created), Some(id), Some(fingerprint)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("not a page token"));
    };
    let created = created.parse().map_err(|_| bad("not a page token"))?;
    if fingerprint != filter.fingerprint() {
        return Err(bad("this page token was made for other filters"));
    }
    Ok(Cursor { created, id: id.to_string() })
}

/// One page of `newest_first` (sorted newest first) and the token for the next, if more match.
pub fn page(newest_first: Vec<BackupRecord>, query: &Query) -> (Vec<BackupRecord>, Option<String>) {
    let mut matching = newest_first
        .into_iter()
        .filter(|r| query.after.as_ref().is_none_or(|c| c.precedes(r)))
        .filter(|r| query.filter.matches(r));
    let page: Vec<BackupRecord> = matching.by_ref().take(query.page_size).collect();
    let more = matching.next().is_some();
    let next = page.last().filter(|_| more).map(|last| token(&Cursor::of(last), &query.filter));
    (page, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, group: &str, created: Millis) -> BackupRecord {
        BackupRecord::new(id, group, &["a".to_string()], "operator:test", created)
    }

    fn ids(records: &[BackupRecord]) -> Vec<&str> {
        records.iter().map(|r| r.id.as_str()).collect()
    }

    fn query(filter: Filter, page_size: usize, after: Option<Cursor>) -> Query {
        Query { filter, page_size, after }
    }

    #[test]
    fn pages_follow_the_cursor_and_a_newer_backup_shifts_nothing() {
        // Two backups in the same millisecond are ordered by id.
        let all = vec![
            record("e", "g", 5),
            record("d", "g", 4),
            record("c2", "h", 3),
            record("c1", "g", 3),
            record("a", "g", 1),
        ];
        let (first, token) = page(all.clone(), &query(Filter::default(), 2, None));
        assert_eq!(ids(&first), ["e", "d"]);
        let token = token.expect("more");
        let mut newer = vec![record("f", "g", 6)];
        newer.extend(all.clone());
        let after = parse_token(&token, &Filter::default()).unwrap();
        let (second, token) = page(newer.clone(), &query(Filter::default(), 2, Some(after)));
        assert_eq!(ids(&second), ["c2", "c1"]);
        let after = parse_token(&token.expect("more"), &Filter::default()).unwrap();
        let (third, token) = page(newer, &query(Filter::default(), 2, Some(after)));
        assert_eq!((ids(&third), token), (vec!["a"], None));
    }

    #[test]
    fn filters_combine_and_tokens_belong_to_their_filters() {
        let all = vec![record("c", "g", 30), record("b", "h", 20), record("a", "g", 10)];
        let g = Filter { group: Some("g".into()), ..Filter::default() };
        assert_eq!(ids(&page(all.clone(), &query(g.clone(), 10, None)).0), ["c", "a"]);
        let range =
            Filter { created_from: Some(20), created_before: Some(30), ..Filter::default() };
        assert_eq!(ids(&page(all.clone(), &query(range, 10, None)).0), ["b"]);
        let pending = Filter { states: vec![StateName::Pending], ..Filter::default() };
        assert_eq!(page(all.clone(), &query(pending, 10, None)).0.len(), 3);
        let failed = Filter { states: vec![StateName::Failed], ..Filter::default() };
        assert!(page(all.clone(), &query(failed, 10, None)).0.is_empty());

        let (_, token) = page(all, &query(g.clone(), 1, None));
        let token = token.expect("more");
        assert!(parse_token(&token, &g).is_ok());
        assert!(matches!(
            parse_token(&token, &Filter::default()),
            Err(Error::InvalidArgument { field: "page_token", .. })
        ));
        assert!(parse_token("zz", &g).is_err());
        assert!(parse_token("abc", &g).is_err());
    }
}
