//! Trunk ports on a kernel without 802.1Q devices: tc eBPF programs demultiplex the VLANs of
//! one trunk's parent device (the VM's tap) onto one host device per subport, and tag the way
//! back. The ports controller wires each trunk of the node's view (`trunk::desired`).
//!
//! The programs are tiny and are generated here as eBPF instructions with the VLAN ids and
//! interface indexes baked in as immediates (no clang, no maps): one program per device,
//! rebuilt and replaced on every [`apply`]. Loading and attaching are `bpf(2)` calls: tcx
//! ingress (Linux 6.6+), which runs before the classic tc ingress filters, so QoS policing on
//! the tap (a tc filter redirecting to an IFB, whose frames skip tc on their way back) cannot
//! bypass the demultiplexing. Device names resolve in the calling thread's network namespace.

use super::bpf::*;
use super::KernelError;
use std::collections::BTreeSet;

pub use crate::trunk::{Subport, TrunkWiring};

const ETH_P_8021Q: u16 = 0x8100;

/// The trunk programs, as the kernel names them.
pub const KIND: Kind = Kind {
    name: *b"isthmus_vlan\0\0\0\0",
    what: "VLAN",
};

/// The parent device's ingress program: a frame tagged with a subport's VLAN id loses its tag
/// and goes to that subport's device (`(vlan, ifindex)` pairs); untagged frames continue as
/// usual (TC_ACT_UNSPEC, so later filters such as QoS still see them); any other tag is
/// dropped. The tag may be in the skb's metadata (the receive path usually moves it there) or
/// still in the frame.
pub fn parent_program(subports: &[(u16, u32)]) -> Vec<Insn> {
    let mut a = Asm::default();
    let (in_data, dispatch, drop, pass) = (a.label(), a.label(), a.label(), a.label());
    a.op(MOV64_X, 6, 1, 0, 0);
    a.op(LDX_W, 2, 6, skb::VLAN_PRESENT, 0);
    a.jump(JEQ_K, 2, 0, 0, in_data);
    a.op(LDX_W, 2, 6, skb::VLAN_PROTO, 0);
    a.jump(JNE_K, 2, 0, ethertype(ETH_P_8021Q), drop);
    a.op(LDX_W, 2, 6, skb::VLAN_TCI, 0);
    a.op(AND64_K, 2, 0, 0, 0x0fff);
    a.jump(JA, 0, 0, 0, dispatch);

    a.here(in_data);
    a.ethertype_of_frame(6, 18, pass);
    a.jump(JNE_K, 4, 0, ethertype(ETH_P_8021Q), pass);
    a.op(LDX_H, 2, 2, 14, 0);
    a.op(TO_BE, 2, 0, 0, 16);
    a.op(AND64_K, 2, 0, 0, 0x0fff);

    a.here(dispatch);
    let targets: Vec<Label> = subports
        .iter()
        .map(|&(vlan, _)| {
            let l = a.label();
            a.jump(JEQ_K, 2, 0, i32::from(vlan), l);
            l
        })
        .collect();
    a.here(drop);
    a.ret(TC_ACT_SHOT);
    a.here(pass);
    a.ret(TC_ACT_UNSPEC);
    for (l, &(_, ifindex)) in targets.into_iter().zip(subports) {
        a.here(l);
        a.op(MOV64_X, 1, 6, 0, 0);
        a.op(CALL, 0, 0, 0, helper::SKB_VLAN_POP);
        a.jump(JNE_K, 0, 0, 0, drop);
        a.redirect(ifindex);
    }
    a.finish()
}

/// A subport device's ingress program: tag with `vlan` and send out of the parent device
/// (toward the VM). Frames that already carry a tag are dropped rather than double-tagged.
pub fn subport_program(vlan: u16, parent_ifindex: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    let drop = a.label();
    a.op(LDX_W, 2, 1, skb::VLAN_PRESENT, 0);
    a.jump(JNE_K, 2, 0, 0, drop);
    a.op(MOV64_K, 2, 0, 0, ethertype(ETH_P_8021Q));
    a.op(MOV64_K, 3, 0, 0, i32::from(vlan));
    a.op(CALL, 0, 0, 0, helper::SKB_VLAN_PUSH);
    a.jump(JNE_K, 0, 0, 0, drop);
    a.redirect(parent_ifindex);
    a.here(drop);
    a.ret(TC_ACT_SHOT);
    a.finish()
}

fn invalid(msg: String) -> KernelError {
    KernelError::io(
        "trunk wiring",
        std::io::Error::new(std::io::ErrorKind::InvalidInput, msg),
    )
}

/// VLAN ids 1–4094, each once; each device once.
pub fn validate(w: &TrunkWiring) -> Result<(), KernelError> {
    let mut vlans = BTreeSet::new();
    let mut devs = BTreeSet::from([w.parent_dev.as_str()]);
    for s in &w.subports {
        if !(1..=4094).contains(&s.vlan) {
            return Err(invalid(format!("VLAN id {} is not in 1-4094", s.vlan)));
        }
        if !vlans.insert(s.vlan) {
            return Err(invalid(format!("VLAN id {} used twice", s.vlan)));
        }
        if !devs.insert(s.dev.as_str()) {
            return Err(invalid(format!("device {} used twice", s.dev)));
        }
    }
    Ok(())
}

/// Wires the trunk: (re)places the programs on the parent and every subport device. Subports
/// dropped from `w` since the last call keep their program until [`remove`] is called with
/// them; the parent's new program already drops their VLAN.
pub fn apply(w: &TrunkWiring) -> Result<(), KernelError> {
    validate(w)?;
    let parent = ifindex(&w.parent_dev)?;
    let mut pairs = Vec::with_capacity(w.subports.len());
    for s in &w.subports {
        pairs.push((s.vlan, ifindex(&s.dev)?));
    }
    // Subports first: by the time the parent hands them frames, the way back exists.
    for s in &w.subports {
        attach(KIND, &s.dev, &subport_program(s.vlan, parent))?;
    }
    attach(KIND, &w.parent_dev, &parent_program(&pairs))
}

/// Removes our programs from the trunk's devices; devices already gone count as done.
pub fn remove(w: &TrunkWiring) -> Result<(), KernelError> {
    detach(KIND, &w.parent_dev)?;
    remove_subports(w)
}

/// How many trunk programs are on `dev`'s ingress (0 or 1 unless something went wrong).
pub fn attached(dev: &str) -> Result<usize, KernelError> {
    super::bpf::attached(KIND, dev)
}

/// Loads a trunk program and runs it once on `frame` ([`super::bpf::test_run`]).
pub fn test_run(insns: &[Insn], frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
    super::bpf::test_run(KIND, insns, frame)
}

/// Removes our programs from `w`'s subport devices only (subports leaving a trunk that stays).
pub fn remove_subports(w: &TrunkWiring) -> Result<(), KernelError> {
    for s in &w.subports {
        detach(KIND, &s.dev)?;
    }
    Ok(())
}

/// The interface indexes `w`'s devices have now, parent first: the programs hold them, so a
/// change means the programs must be made again.
pub fn indexes(w: &TrunkWiring) -> Result<Vec<u32>, KernelError> {
    std::iter::once(&w.parent_dev)
        .chain(w.subports.iter().map(|s| &s.dev))
        .map(|d| ifindex(d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }

    #[test]
    fn encodes_registers_in_the_right_nibbles() {
        assert_eq!(ins(LDX_W, 2, 6, 20, 0).encode(), [0x61, 0x62, 20, 0, 0, 0, 0, 0]);
        assert_eq!(
            ins(MOV64_K, 0, 0, 0, -1).encode(),
            [0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn subport_program_tags_and_redirects_to_the_parent() {
        let p = subport_program(100, 7);
        assert_eq!(
            p,
            vec![
                ins(LDX_W, 2, 1, 20, 0),
                ins(JNE_K, 2, 0, 8, 0),
                ins(MOV64_K, 2, 0, 0, 0x0081),
                ins(MOV64_K, 3, 0, 0, 100),
                ins(CALL, 0, 0, 0, 18),
                ins(JNE_K, 0, 0, 4, 0),
                ins(MOV64_K, 1, 0, 0, 7),
                ins(MOV64_K, 2, 0, 0, 0),
                ins(CALL, 0, 0, 0, 23),
                ins(EXIT, 0, 0, 0, 0),
                ins(MOV64_K, 0, 0, 0, TC_ACT_SHOT),
                ins(EXIT, 0, 0, 0, 0),
            ]
        );
    }

    /// Follows the jumps of a parent program for a frame whose VLAN id is already in r2 (the
    /// dispatch part), returning the redirect target or the verdict.
    fn dispatch(p: &[Insn], vlan: i32) -> Result<u32, i32> {
        // The metadata branch ends with a jump to the dispatch.
        let ja = p.iter().position(|i| i.code == JA).unwrap();
        let mut pc = (ja as i64 + 1 + i64::from(p[ja].off)) as usize;
        loop {
            let i = p[pc];
            match i.code {
                JEQ_K if i.imm == vlan => pc = (pc as i64 + 1 + i64::from(i.off)) as usize,
                JEQ_K => pc += 1,
                MOV64_K if i.dst == 0 => return Err(i.imm),
                MOV64_X => {
                    // mov r1, r6; call pop; jne r0 drop; mov r1, ifindex
                    assert_eq!(p[pc + 1], ins(CALL, 0, 0, 0, helper::SKB_VLAN_POP));
                    return Ok(p[pc + 3].imm as u32);
                }
                other => panic!("unexpected opcode {other:#x} at {pc}"),
            }
        }
    }

    #[test]
    fn parent_program_maps_each_vlan_to_its_device_and_drops_the_rest() {
        let p = parent_program(&[(100, 7), (200, 9)]);
        assert_eq!(dispatch(&p, 100), Ok(7));
        assert_eq!(dispatch(&p, 200), Ok(9));
        assert_eq!(dispatch(&p, 300), Err(TC_ACT_SHOT));
        // Every jump lands inside the program.
        for (at, i) in p.iter().enumerate() {
            if matches!(i.code, JA | JEQ_K | JNE_K | JGT_X) {
                let t = at as i64 + 1 + i64::from(i.off);
                assert!((0..p.len() as i64).contains(&t), "jump at {at} to {t}");
            }
        }
        assert_eq!(p.last(), Some(&ins(EXIT, 0, 0, 0, 0)));
        // Untagged frames continue (UNSPEC), so later filters still run.
        assert!(p.contains(&ins(MOV64_K, 0, 0, 0, TC_ACT_UNSPEC)));
    }

    #[test]
    fn parent_program_without_subports_drops_every_tagged_frame() {
        let p = parent_program(&[]);
        assert_eq!(dispatch(&p, 100), Err(TC_ACT_SHOT));
    }

    #[test]
    fn validation_refuses_bad_and_duplicate_vlans() {
        let w = |subports: Vec<(u16, &str)>| TrunkWiring {
            parent_dev: "tap0".into(),
            subports: subports
                .into_iter()
                .map(|(vlan, dev)| Subport {
                    vlan,
                    dev: dev.into(),
                    bridged: format!("br-{dev}"),
                })
                .collect(),
        };
        assert!(validate(&w(vec![(100, "a"), (200, "b")])).is_ok());
        assert!(validate(&w(vec![(0, "a")])).is_err());
        assert!(validate(&w(vec![(4095, "a")])).is_err());
        assert!(validate(&w(vec![(100, "a"), (100, "b")])).is_err());
        assert!(validate(&w(vec![(100, "a"), (200, "a")])).is_err());
        assert!(validate(&w(vec![(100, "tap0")])).is_err());
    }
}
