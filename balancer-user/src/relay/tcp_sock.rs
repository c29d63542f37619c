//! Where the running kernel keeps a TCP socket's `copied_seq`, read from its BTF.
//!
//! The verdict compares the first chunk it takes from a socket with what user space read
//! before the insert (`copied_seq`), to cut off a stale head there too. `struct tcp_sock`
//! changes between kernel builds, so the offset comes from `/sys/kernel/btf/vmlinux` at load
//! time, as a CO-RE relocation would give it.
//!
//! Only what that lookup needs of the BTF format (linux/btf.h, Documentation/bpf/btf.rst):
//! walk the type section, find the struct by name, read its member's bit offset. (The one
//! crate that does this, btf-rs, is LGPL; aya's own parser keeps its types private.)

use std::path::Path;

use anyhow::{Context, bail, ensure};

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// The byte offset of `copied_seq` in `struct tcp_sock`, per the BTF at `path`.
pub fn copied_seq_offset(path: &Path) -> anyhow::Result<u32> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    member_offset(&data, "tcp_sock", "copied_seq")
}

/// The byte offset of the direct member `member` of `struct name`, in the BTF blob `data`.
fn member_offset(data: &[u8], name: &str, member: &str) -> anyhow::Result<u32> {
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    ensure!(u16_at(0) == Some(MAGIC), "not little-endian BTF");
    let header = Reader { data, at: 4 };
    let header_len = header.u32(0)? as usize;
    let (type_off, type_len) = (header.u32(4)? as usize, header.u32(8)? as usize);
    let str_off = header.u32(12)? as usize;
    let strings = header_len + str_off;
    let name_at = |offset: u32| -> anyhow::Result<&[u8]> {
        let start = strings + offset as usize;
        let tail = data.get(start..).context("string offset out of range")?;
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .context("unterminated string")?;
        Ok(&tail[..end])
    };

    let types = Reader {
        data,
        at: header_len + type_off,
    };
    let mut at = 0;
    while at < type_len {
        let (name_off, info) = (types.u32(at)?, types.u32(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let bitfields = info >> 31 == 1;
        at += 12;
        if kind == KIND_STRUCT && name_at(name_off)? == name.as_bytes() {
            for index in 0..vlen {
                let entry = at + index * 12;
                if name_at(types.u32(entry)?)? != member.as_bytes() {
                    continue;
                }
                let offset = types.u32(entry + 8)?;
                // With the kind flag, the top 8 bits hold a bit field's size.
                let (bits, size) = if bitfields {
                    (offset & 0xff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                ensure!(
                    bits % 8 == 0 && size == 0,
                    "struct {name}: {member} is a bit field"
                );
                return Ok(bits / 8);
            }
            bail!("struct {name} has no member {member}");
        }
        at += trailer_len(kind, vlen)?;
    }
    bail!("no struct {name}")
}

/// The bytes that follow a type's 12-byte header, by kind.
fn trailer_len(kind: u32, vlen: usize) -> anyhow::Result<usize> {
    Ok(match kind {
        // INT, VAR, DECL_TAG: one u32.
        1 | 14 | 17 => 4,
        // ARRAY: element type, index type, length.
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per member.
        4 | 5 | 15 | 19 => vlen * 12,
        // ENUM, FUNC_PROTO: 8 bytes per entry.
        6 | 13 => vlen * 8,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing.
        2 | 7..=12 | 16 | 18 => 0,
        other => bail!("unknown BTF kind {other}"),
    })
}

/// Little-endian u32s at offsets from `at`.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u32(&self, offset: usize) -> anyhow::Result<u32> {
        let start = self.at + offset;
        let bytes = self
            .data
            .get(start..start + 4)
            .context("BTF shorter than its header says")?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int`, `struct s { int a; int b; unsigned c:3; }` behind a typedef, and a
    /// struct `t` of the same member names whose `b` is elsewhere.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0t\0td\0".to_vec();
        let name = |text: &str| -> u32 {
            let needle = [&[0u8][..], text.as_bytes(), &[0u8][..]].concat();
            let at = strings
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap();
            (at + 1) as u32
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        // [1] int: INT, size 4, encoding word.
        push(&[name("int"), 1 << 24, 4, 32]);
        // [2] typedef td -> 1: skipped on the way.
        push(&[name("td"), 8 << 24, 1]);
        // [3] struct t { a at 0, b at 64 bits }.
        push(&[
            name("t"),
            (4 << 24) | 2,
            12,
            name("a"),
            1,
            0,
            name("b"),
            1,
            64,
        ]);
        // [4] struct s, kind flag set: a at 0, b at 32 bits, c a 3-bit field at 64.
        push(&[(name("s")), (1 << 31) | (4 << 24) | 3, 12]);
        push(&[
            name("a"),
            1,
            0,
            name("b"),
            1,
            32,
            name("c"),
            1,
            (3 << 24) | 64,
        ]);
        let mut data = Vec::new();
        data.extend(MAGIC.to_le_bytes());
        data.extend([1, 0]);
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend(word.to_le_bytes());
        }
        data.extend(types);
        data.extend(strings);
        data
    }

    #[test]
    fn finds_the_member_of_the_named_struct() {
        let data = blob();
        assert_eq!(member_offset(&data, "s", "b").unwrap(), 4);
        assert_eq!(member_offset(&data, "t", "b").unwrap(), 8);
        assert_eq!(member_offset(&data, "s", "a").unwrap(), 0);
    }

    #[test]
    fn refuses_what_it_cannot_answer() {
        let data = blob();
        let error = |name, member| format!("{:#}", member_offset(&data, name, member).unwrap_err());
        assert!(error("s", "c").contains("bit field"));
        assert!(error("s", "d").contains("no member d"));
        assert!(error("u", "a").contains("no struct u"));
        assert!(
            format!("{:#}", member_offset(&data[..20], "s", "a").unwrap_err()).contains("shorter")
        );
        assert!(member_offset(b"\x9f\xeb", "s", "a").is_err());
        assert!(member_offset(b"not btf at all", "s", "a").is_err());
    }

    /// On the machine that runs the tests: the offset lies inside the structure, and
    /// `rcv_nxt`, which the kernel keeps in a later cache-line group, follows it. (The
    /// kernel relay's tests show the verdict reads the right field: lossy.rs.)
    #[test]
    fn the_running_kernel_has_copied_seq_before_rcv_nxt() {
        let Ok(data) = std::fs::read(VMLINUX_BTF) else {
            eprintln!("no {VMLINUX_BTF}: skipped");
            return;
        };
        let copied = member_offset(&data, "tcp_sock", "copied_seq").unwrap();
        let rcv_nxt = member_offset(&data, "tcp_sock", "rcv_nxt").unwrap();
        assert!(copied > 0 && copied < rcv_nxt, "{copied} {rcv_nxt}");
        assert_eq!(copied_seq_offset(Path::new(VMLINUX_BTF)).unwrap(), copied);
    }
}
