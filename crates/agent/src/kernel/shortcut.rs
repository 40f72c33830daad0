//! Routing shortcuts ([`crate::routing::Shortcut`]): a tc program on a router leg's outer end
//! sends routed frames for ports on other nodes straight to the network's VXLAN device.
//!
//! Without it a routed frame crosses two bridges on the source node (into the router and out
//! of it), and each crossing runs the node's bridge firewall hooks and connection tracking.
//! The second crossing filters nothing (the frame comes from a router leg and leaves by VXLAN)
//! but costs as much as the first. The VXLAN device looks the MAC up in its own forwarding
//! table, as it does for frames the bridge hands it.
//!
//! Only IPv4 and IPv6 TCP/UDP frames are sent on: ARP and neighbour discovery from a leg must
//! meet the DVR table on the bridge (each node answers for its own gateway).

use super::bpf::*;
use super::KernelError;
use crate::routing::Shortcut;

/// The shortcut programs, as the kernel names them.
pub const KIND: Kind = Kind {
    name: *b"isthmus_route\0\0\0",
    what: "routing shortcut",
};

const IPPROTO_TCP: i32 = 6;
const IPPROTO_UDP: i32 = 17;

/// The program for one leg: a unicast IPv4 frame, or an IPv6 one whose next header is TCP or
/// UDP, addressed to one of `macs` goes to `vxlan`'s egress; anything else continues to the
/// bridge (TC_ACT_UNSPEC).
pub fn program(macs: &[[u8; 6]], vxlan: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    if macs.is_empty() {
        // The verifier refuses unreachable instructions (the redirect below).
        a.ret(TC_ACT_UNSPEC);
        return a.finish();
    }
    let (pass, by_mac, send) = (a.label(), a.label(), a.label());
    // Ethernet plus the 20 bytes of an IPv4 header (covers IPv6's next header at 20).
    a.ethertype_of_frame(1, 34, pass);
    a.jump(JEQ_K, 4, 0, ethertype(0x0800), by_mac);
    a.jump(JNE_K, 4, 0, ethertype(0x86dd), pass);
    a.op(LDX_B, 4, 2, 20, 0);
    a.jump(JEQ_K, 4, 0, IPPROTO_TCP, by_mac);
    a.jump(JNE_K, 4, 0, IPPROTO_UDP, pass);
    a.here(by_mac);
    a.op(LDX_W, 4, 2, 0, 0);
    a.op(LDX_H, 5, 2, 4, 0);
    for m in macs {
        let next = a.label();
        a.jump(JNE32_K, 4, 0, i32::from_ne_bytes([m[0], m[1], m[2], m[3]]), next);
        a.jump(JEQ_K, 5, 0, i32::from(u16::from_ne_bytes([m[4], m[5]])), send);
        a.here(next);
    }
    a.here(pass);
    a.ret(TC_ACT_UNSPEC);
    a.here(send);
    a.redirect(vxlan);
    a.finish()
}

/// The interface indexes the program for `dev` depends on: the leg's and the VXLAN device's.
pub fn indexes(dev: &str, s: &Shortcut) -> Result<(u32, u32), KernelError> {
    Ok((ifindex(dev)?, ifindex(&s.vxlan)?))
}

/// Puts `s`'s program on leg end `dev` (replacing ours), or removes ours when `s` lists no MAC.
pub fn apply(dev: &str, s: &Shortcut) -> Result<(), KernelError> {
    if s.macs.is_empty() {
        return detach(KIND, dev);
    }
    let vxlan = ifindex(&s.vxlan)?;
    let macs: Vec<[u8; 6]> = s.macs.iter().map(|m| m.0).collect();
    attach(KIND, dev, &program(&macs, vxlan))
}

/// Whether our program is on `dev`.
pub fn attached(dev: &str) -> Result<bool, KernelError> {
    Ok(super::bpf::attached(KIND, dev)? > 0)
}

/// Loads a shortcut program and runs it once on `frame` ([`super::bpf::test_run`]).
pub fn test_run(insns: &[Insn], frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
    super::bpf::test_run(KIND, insns, frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_and_the_program_ends_by_exiting() {
        let p = program(&[[0xfa, 0x16, 0x3e, 0, 0, 1], [0xfa, 0x16, 0x3e, 0xff, 0xff, 0xfe]], 9);
        for (at, i) in p.iter().enumerate() {
            if matches!(i.code, JA | JEQ_K | JNE_K | JGT_X | JNE32_K) {
                let t = at as i64 + 1 + i64::from(i.off);
                assert!((0..p.len() as i64).contains(&t), "jump at {at} to {t}");
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(EXIT));
        // Two instructions per MAC.
        let one = program(&[[2, 0, 0, 0, 0, 1]], 9).len();
        assert_eq!(p.len(), one + 2);
    }
}
