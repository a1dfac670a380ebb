//! A reader of `thin_delta`'s output (thin-provisioning-tools, the non-verbose form): which data
//! blocks two thin devices of one pool map to the same place. Pure, no IO. Only `<same>` ranges
//! prove bytes unchanged (two devices mapping a virtual block to one data block read the same);
//! everything else, including blocks the output does not mention, may differ. Anything it does
//! not understand (an element, an attribute, text, overflow, a range out of order or past the
//! device) is refused with why, so the caller reads everything.

use std::ops::Range;

/// Bytes per sector: `data_block_size` is in sectors.
const SECTOR: u64 = 512;

/// What one `thin_delta --snap1 L --snap2 R` run says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The pool's data block (its chunk), in bytes.
    pub block_bytes: u64,
    /// The metadata's transaction id: a metadata snapshot older than the devices compared
    /// shows an older one.
    pub transaction: u64,
    /// Byte ranges of the right device, sorted and disjoint, that may differ from the left.
    pub changed: Vec<Range<u64>>,
}

/// How one range element of a diff is classed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Same,
    Changed,
}

/// Parses `thin_delta`'s output for the diff of thin devices `left` and `right` of `size`
/// bytes: the bytes of `right` that may differ from `left`. The ranges named in blocks are
/// checked to lie in the device (the last block may reach past a size that is not a multiple of
/// the block; its bytes past the end are cut).
pub fn parse(text: &str, left: u64, right: u64, size: u64) -> Result<Delta, String> {
    let mut tags = Tags { text, at: 0 };
    let superblock = tags.expect_open("superblock", false)?;
    let block_sectors = superblock.number("data_block_size")?;
    let transaction = superblock.number("transaction")?;
    superblock.only(&[
        "uuid",
        "time",
        "transaction",
        "data_block_size",
        "nr_data_blocks",
        "metadata_snap",
        "flags",
        "version",
    ])?;
    if block_sectors == 0 {
        return Err("data_block_size is 0".into());
    }
    let block_bytes = block_sectors
        .checked_mul(SECTOR)
        .ok_or_else(|| format!("data_block_size {block_sectors} sectors overflows"))?;
    let diff = tags.expect_open("diff", false)?;
    diff.only(&["left", "right"])?;
    let (l, r) = (diff.number("left")?, diff.number("right")?);
    if (l, r) != (left, right) {
        return Err(format!("the diff is of devices {l} and {r}, not {left} and {right}"));
    }
    // Blocks of the device: the last one may be partly past its end.
    let blocks = size.div_ceil(block_bytes);
    let mut next = 0u64; // the first block no range has covered yet
    let mut same: Vec<Range<u64>> = Vec::new();
    loop {
        let tag = tags.next()?.ok_or("the output ends inside <diff>")?;
        if tag.close {
            if tag.name != "diff" {
                return Err(format!("</{}> inside <diff>", tag.name));
            }
            break;
        }
        let kind = match tag.name {
            "same" => Kind::Same,
            "different" | "left_only" | "right_only" => Kind::Changed,
            other => return Err(format!("unknown element <{other}> in <diff>")),
        };
        if !tag.empty {
            return Err(format!("<{}> with content (the --verbose form is not read)", tag.name));
        }
        tag.only(&["begin", "length"])?;
        let (begin, length) = (tag.number("begin")?, tag.number("length")?);
        let end = begin
            .checked_add(length)
            .ok_or_else(|| format!("<{} begin={begin} length={length}> overflows", tag.name))?;
        if length == 0 {
            return Err(format!("<{} begin={begin}> of length 0", tag.name));
        }
        if begin < next {
            return Err(format!(
                "<{} begin={begin}> overlaps or goes back (block {next} was next)",
                tag.name
            ));
        }
        if end > blocks {
            return Err(format!(
                "<{} begin={begin} length={length}> reaches past the device's {blocks} blocks of {block_bytes} bytes",
                tag.name
            ));
        }
        next = end;
        if kind == Kind::Same {
            match same.last_mut() {
                Some(last) if last.end == begin => last.end = end,
                _ => same.push(begin..end),
            }
        }
    }
    match tags.next()? {
        Some(t) if t.close && t.name == "superblock" => {}
        Some(t) => {
            return Err(format!("<{}{}> after </diff>", if t.close { "/" } else { "" }, t.name))
        }
        None => return Err("the output ends without </superblock>".into()),
    }
    if let Some(t) = tags.next()? {
        return Err(format!("<{}{}> after </superblock>", if t.close { "/" } else { "" }, t.name));
    }
    // Changed: every byte of the device outside the same ranges (blocks the output does not
    // name included: both unmapped, or, in thin-provisioning-tools 0.9, a mapping its diff
    // loop dropped at the end of one side's list).
    let mut changed = Vec::new();
    let mut at = 0u64;
    for r in same {
        // In bytes: r.start < blocks, so its start is below `size`; the last block's end may
        // be past `size` (or past u64::MAX for a device that large), so it saturates and is cut.
        let (start, end) = (r.start * block_bytes, r.end.saturating_mul(block_bytes).min(size));
        if start > at {
            changed.push(at..start);
        }
        at = end;
    }
    if at < size {
        changed.push(at..size);
    }
    Ok(Delta { block_bytes, transaction, changed })
}

/// One tag: `<name a="v" ...>`, `<name .../>` or `</name>`.
#[derive(Debug)]
struct Tag<'a> {
    name: &'a str,
    attrs: Vec<(&'a str, &'a str)>,
    /// `</name>`.
    close: bool,
    /// `<name .../>`.
    empty: bool,
}

impl Tag<'_> {
    fn value(&self, attr: &str) -> Result<&str, String> {
        self.attrs
            .iter()
            .find(|(k, _)| *k == attr)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("<{}> without {attr}", self.name))
    }

    /// A decimal u64 attribute (digits only: no sign, no spaces, no hex).
    fn number(&self, attr: &str) -> Result<u64, String> {
        let v = self.value(attr)?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("<{}> {attr}={v:?} is not a number", self.name));
        }
        v.parse().map_err(|_| format!("<{}> {attr}={v} overflows", self.name))
    }

    /// Refuses attributes other than `known`.
    fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.attrs.iter().find(|(k, _)| !known.contains(k)) {
            Some((k, _)) => Err(format!("unknown attribute {k} on <{}>", self.name)),
            None => Ok(()),
        }
    }
}

/// The tags of a document that holds nothing but tags and whitespace between them.
struct Tags<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Tags<'a> {
    /// The next opening tag, which must be `<name ...>` (or `<name .../>` if `empty`).
    fn expect_open(&mut self, name: &str, empty: bool) -> Result<Tag<'a>, String> {
        match self.next()? {
            Some(t) if !t.close && t.name == name && t.empty == empty => Ok(t),
            Some(t) => Err(format!(
                "<{}{}> where <{name}> was expected",
                if t.close { "/" } else { "" },
                t.name
            )),
            None => Err(format!("no <{name}> in the output")),
        }
    }

    fn next(&mut self) -> Result<Option<Tag<'a>>, String> {
        let rest = &self.text[self.at..];
        let trimmed = rest.trim_start();
        if trimmed.is_empty() {
            self.at = self.text.len();
            return Ok(None);
        }
        self.at += rest.len() - trimmed.len();
        if !trimmed.starts_with('<') {
            let shown: String = trimmed.chars().take(32).collect();
            return Err(format!("text outside a tag at byte {}: {shown:?}", self.at));
        }
        let end =
            trimmed.find('>').ok_or_else(|| format!("a tag at byte {} is not closed", self.at))?;
        let inner = &trimmed[1..end];
        self.at += end + 1;
        if let Some(name) = inner.strip_prefix('/') {
            check_name(name)?;
            return Ok(Some(Tag { name, attrs: Vec::new(), close: true, empty: false }));
        }
        let (inner, empty) = match inner.strip_suffix('/') {
            Some(i) => (i, true),
            None => (inner, false),
        };
        let name_end = inner.find(|c: char| c.is_ascii_whitespace()).unwrap_or(inner.len());
        let name = &inner[..name_end];
        check_name(name)?;
        let mut attrs = Vec::new();
        let mut rest = inner[name_end..].trim_start();
        while !rest.is_empty() {
            let eq =
                rest.find('=').ok_or_else(|| format!("<{name}>: an attribute without a value"))?;
            let key = &rest[..eq];
            check_name(key)?;
            let after = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("<{name}> {key}: the value is not quoted"))?;
            let close = after
                .find('"')
                .ok_or_else(|| format!("<{name}> {key}: the value is not closed"))?;
            let value = &after[..close];
            if value.contains(['&', '<']) {
                return Err(format!("<{name}> {key}: entities are not read"));
            }
            if attrs.iter().any(|(k, _)| *k == key) {
                return Err(format!("<{name}> has {key} twice"));
            }
            attrs.push((key, value));
            let next = &after[close + 1..];
            if !next.is_empty() && !next.starts_with(|c: char| c.is_ascii_whitespace()) {
                return Err(format!("<{name}> {key}: no space after the value"));
            }
            rest = next.trim_start();
        }
        Ok(Some(Tag { name, attrs, close: false, empty }))
    }
}

/// Element and attribute names: lowercase letters and `_`, as thin_delta writes them.
fn check_name(name: &str) -> Result<(), String> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        Ok(())
    } else {
        let shown: String = name.chars().take(32).collect();
        Err(format!("{shown:?} is not an element or attribute name thin_delta writes"))
    }
}

#[cfg(test)]
mod tests;
