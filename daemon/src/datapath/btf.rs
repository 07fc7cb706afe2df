//! Offsets of named members of a kernel struct, read from the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): the one relocation CO-RE would do for us, which Rust BPF
//! programs do not get. Members inside anonymous structs and unions are found too, as C
//! code names them.

use quicklane_common::PsockLayout;

/// The running kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown BTF kind {kind} (type {id})")]
    UnknownKind { kind: u32, id: usize },
    #[error("no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("struct {strukt} member {member} is a bitfield")]
    Bitfield { strukt: String, member: String },
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type record: its kind, name, vlen, and where its trailing data starts.
#[derive(Clone, Copy)]
struct Type {
    kind: u32,
    name: u32,
    vlen: usize,
    kind_flag: bool,
    data: usize,
}

struct Btf<'a> {
    types: Vec<Type>,
    type_data: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, BtfError> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Truncated(at))
}

impl<'a> Btf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, BtfError> {
        if bytes.len() < 24 || u16::from_ne_bytes([bytes[0], bytes[1]]) != MAGIC {
            return Err(BtfError::Header);
        }
        let hdr_len = u32_at(bytes, 4)? as usize;
        let section = |off: usize, len: usize| -> Result<&'a [u8], BtfError> {
            let start = hdr_len + u32_at(bytes, off)? as usize;
            let len = u32_at(bytes, len)? as usize;
            bytes
                .get(start..start + len)
                .ok_or(BtfError::Truncated(start))
        };
        let type_data = section(8, 12)?;
        let strings = section(16, 20)?;
        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let info = u32_at(type_data, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                2 | 7..=12 | 16 | 18 => 0,
                // INT, VAR, DECL_TAG
                1 | 14 | 17 => 4,
                // ARRAY
                3 => 12,
                // STRUCT, UNION, DATASEC, ENUM64
                4 | 5 | 15 | 19 => 12 * vlen,
                // ENUM, FUNC_PROTO
                6 | 13 => 8 * vlen,
                _ => {
                    return Err(BtfError::UnknownKind {
                        kind,
                        id: types.len() + 1,
                    })
                }
            };
            types.push(Type {
                kind,
                name: u32_at(type_data, at)?,
                vlen,
                kind_flag: info >> 31 != 0,
                data: at + 12,
            });
            at += 12 + extra;
        }
        Ok(Self {
            types,
            type_data,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        &tail[..tail.iter().position(|&b| b == 0).unwrap_or(tail.len())]
    }

    /// Type ids start at 1 (0 is void).
    fn by_id(&self, id: u32) -> Option<Type> {
        self.types.get((id as usize).checked_sub(1)?).copied()
    }

    /// The bit offset of `member` in the struct or union `ty`, looking into anonymous
    /// members, and whether it is a bitfield.
    fn member_bits(&self, ty: Type, member: &[u8]) -> Result<Option<(u32, bool)>, BtfError> {
        for i in 0..ty.vlen {
            let at = ty.data + 12 * i;
            let (name, type_id, raw) = (
                u32_at(self.type_data, at)?,
                u32_at(self.type_data, at + 4)?,
                u32_at(self.type_data, at + 8)?,
            );
            let (bits, bitfield) = if ty.kind_flag {
                (raw & 0xff_ffff, raw >> 24 != 0)
            } else {
                (raw, false)
            };
            if name != 0 {
                if self.name(name) == member {
                    return Ok(Some((bits, bitfield)));
                }
                continue;
            }
            let Some(inner) = self.by_id(type_id) else {
                continue;
            };
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                if let Some((inner_bits, bitfield)) = self.member_bits(inner, member)? {
                    return Ok(Some((inner_bits + bits, bitfield)));
                }
            }
        }
        Ok(None)
    }

    fn strukt(&self, strukt: &str) -> Result<Type, BtfError> {
        self.types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == strukt.as_bytes())
            .copied()
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))
    }
}

/// Where sk_msg finds a writer's `TCP_NAGLE_OFF`: the bit offset of `tcp_sock.nonagle` in
/// this kernel, 0 when unknown (sk_msg then judges every writer as Nagle's; logged once).
pub fn tcp_nonagle_bit() -> u32 {
    static BIT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *BIT.get_or_init(|| {
        from_vmlinux(
            nonagle_bit,
            "TCP_NODELAY writers are judged as Nagle's: small_msg_bytes and large_msg_bytes apply",
        )
    })
}

/// Where the bypass sees a socket's psock (`PsockLayout`), all 0 when unknown (a reader then
/// stays in the sockhash after its writer moved to TCP, as without this; logged once).
pub fn psock_layout() -> PsockLayout {
    static LAYOUT: std::sync::OnceLock<PsockLayout> = std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        from_vmlinux(
            psock_layout_of,
            "readers stay in the sockhash after their writer moves to TCP",
        )
    })
}

/// `find` applied to the running kernel's BTF; the default (the datapath's "unknown") with a
/// warning saying what `unknown_means` if the BTF is missing or lacks what `find` looks for.
fn from_vmlinux<T: Default>(
    find: impl FnOnce(&[u8]) -> Result<T, BtfError>,
    unknown_means: &str,
) -> T {
    let found = std::fs::read(VMLINUX)
        .map_err(|e| e.to_string())
        .and_then(|bytes| find(&bytes).map_err(|e| e.to_string()));
    found.unwrap_or_else(|e| {
        tracing::warn!("{VMLINUX}: {e}; {unknown_means}");
        T::default()
    })
}

/// `PsockLayout` from a kernel's BTF.
pub fn psock_layout_of(bytes: &[u8]) -> Result<PsockLayout, BtfError> {
    let sock = member_offsets(bytes, "sock", &["sk_user_data"])?;
    let psock = member_offsets(bytes, "sk_psock", &["refcnt", "ingress_msg"])?;
    Ok(PsockLayout {
        sk_user_data: sock[0],
        refcnt: psock[0],
        ingress_msg: psock[1],
    })
}

/// The bit offset of `tcp_sock.nonagle` in a kernel's BTF.
pub fn nonagle_bit(bytes: &[u8]) -> Result<u32, BtfError> {
    member_bit_offset(bytes, "tcp_sock", "nonagle")
}

/// The bit offset of `member` in `struct strukt`, bitfield or not.
pub fn member_bit_offset(bytes: &[u8], strukt: &str, member: &str) -> Result<u32, BtfError> {
    let btf = Btf::parse(bytes)?;
    match btf.member_bits(btf.strukt(strukt)?, member.as_bytes())? {
        Some((bits, _)) => Ok(bits),
        None => Err(BtfError::NoMember {
            strukt: strukt.to_owned(),
            member: member.to_owned(),
        }),
    }
}

/// The byte offset of each of `members` in `struct strukt`, in order.
pub fn member_offsets(bytes: &[u8], strukt: &str, members: &[&str]) -> Result<Vec<u32>, BtfError> {
    let btf = Btf::parse(bytes)?;
    let ty = btf.strukt(strukt)?;
    members
        .iter()
        .map(|&member| {
            let err = |bitfield| {
                let (strukt, member) = (strukt.to_owned(), member.to_owned());
                if bitfield {
                    BtfError::Bitfield { strukt, member }
                } else {
                    BtfError::NoMember { strukt, member }
                }
            };
            match btf.member_bits(ty, member.as_bytes())? {
                Some((bits, false)) if bits % 8 == 0 => Ok(bits / 8),
                Some(_) => Err(err(true)),
                None => Err(err(false)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int`, and `struct s { int a; union { int b; int c; }; int d; }` with the
    /// union anonymous, as `pahole` would encode it.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0c\0d\0";
        let name = |s: &str| {
            let needle = [b"\0", s.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle)
                .unwrap() as u32
                + 1
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_ne_bytes()));
        // 1: int (INT, size 4, 32 bits)
        push(&[name("int"), 1 << 24, 4, 32]);
        // 2: anonymous union { b; c; }
        push(&[0, (KIND_UNION << 24) | 2, 4]);
        push(&[name("b"), 1, 0, name("c"), 1, 0]);
        // 3: struct s { a; <2>; d; }
        push(&[name("s"), (KIND_STRUCT << 24) | 3, 12]);
        push(&[name("a"), 1, 0, 0, 2, 32, name("d"), 1, 64]);
        assemble(&types, strings)
    }

    /// A BTF blob of these type records and strings.
    fn assemble(types: &[u8], strings: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC.to_ne_bytes());
        out.extend([1u8, 0]);
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend(word.to_ne_bytes());
        }
        out.extend(types);
        out.extend(strings);
        out
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        assert_eq!(
            member_offsets(&blob(), "s", &["a", "b", "c", "d"]),
            Ok(vec![0, 4, 4, 8])
        );
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(
            member_offsets(&blob(), "s", &["e"]),
            Err(BtfError::NoMember {
                strukt: "s".into(),
                member: "e".into()
            })
        );
        assert_eq!(
            member_offsets(&blob(), "t", &["a"]),
            Err(BtfError::NoStruct("t".into()))
        );
        assert_eq!(
            member_offsets(b"garbage", "s", &["a"]),
            Err(BtfError::Header)
        );
        let mut cut = blob();
        cut.truncate(40);
        assert!(matches!(
            member_offsets(&cut, "s", &["a"]),
            Err(BtfError::Truncated(_))
        ));
    }

    #[test]
    fn bitfields_have_a_bit_offset_but_no_byte_offset() {
        let strings = b"\0u8\0t\0x\0flag\0";
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_ne_bytes()));
        // 1: u8 (INT, size 1, 8 bits); 2: struct t { u8 x; u8 flag: 4 } (kind_flag set)
        push(&[1, 1 << 24, 1, 8]);
        push(&[4, (1 << 31) | (KIND_STRUCT << 24) | 2, 2]);
        push(&[6, 1, 0, 8, 1, (4 << 24) | 8]);
        let out = assemble(&types, strings);
        assert_eq!(member_bit_offset(&out, "t", "flag"), Ok(8));
        assert_eq!(member_bit_offset(&out, "t", "x"), Ok(0));
        assert!(matches!(
            member_offsets(&out, "t", &["flag"]),
            Err(BtfError::Bitfield { .. })
        ));
        assert!(matches!(
            member_bit_offset(&out, "t", "nope"),
            Err(BtfError::NoMember { .. })
        ));
    }

    /// The running kernel's BTF; `None` (the test has nothing to check) only outside CI.
    fn running_kernels_btf() -> Option<Vec<u8>> {
        let bytes = std::fs::read(VMLINUX).ok();
        assert!(
            bytes.is_some() || std::env::var_os("CI").is_none(),
            "CI needs the kernel's BTF"
        );
        bytes
    }

    /// The running kernel's `tcp_sock` has the `nonagle` bits sk_msg reads, at a whole byte
    /// (sk_msg tests the lowest bit, `TCP_NAGLE_OFF`).
    #[test]
    fn the_running_kernels_tcp_sock_has_nonagle() {
        let Some(bytes) = running_kernels_btf() else {
            return;
        };
        let bit = nonagle_bit(&bytes).unwrap();
        assert!(bit > 0);
    }

    /// The running kernel's BTF places the psock fields the bypass reads (none of them can
    /// be at offset 0: `sk_user_data` follows `sock_common`, `sk_psock` starts with its `sk`).
    #[test]
    fn the_running_kernels_psock_layout_is_known() {
        let Some(bytes) = running_kernels_btf() else {
            return;
        };
        let layout = psock_layout_of(&bytes).unwrap();
        assert!(layout.known(), "{layout:?}");
        assert_ne!(layout.refcnt, layout.ingress_msg);
    }

    /// The running kernel's `sock_common` keeps the fields the adoption iterator reads at
    /// the offsets it assumes.
    #[test]
    fn the_running_kernels_sock_common_has_the_fixed_head() {
        use quicklane_common::adopt::sock_common as skc;
        let Some(bytes) = running_kernels_btf() else {
            return;
        };
        let names = [
            "skc_daddr",
            "skc_rcv_saddr",
            "skc_dport",
            "skc_num",
            "skc_family",
            "skc_state",
        ];
        let wanted = [
            skc::DADDR,
            skc::RCV_SADDR,
            skc::DPORT,
            skc::NUM,
            skc::FAMILY,
            skc::STATE,
        ];
        let found = member_offsets(&bytes, "sock_common", &names).unwrap();
        assert_eq!(found, wanted.map(|o| o as u32));
        let v6 = member_offsets(&bytes, "sock_common", &["skc_v6_daddr", "skc_v6_rcv_saddr"]);
        assert!(v6.unwrap().iter().all(|&o| o as usize >= skc::HEAD));
    }
}
