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

use super::KernelError;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use crate::trunk::{Subport, TrunkWiring};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const ETH_P_8021Q: u16 = 0x8100;

/// Offsets in `struct __sk_buff` (uapi `linux/bpf.h`).
mod skb {
    pub const VLAN_PRESENT: i16 = 20;
    pub const VLAN_TCI: i16 = 24;
    pub const VLAN_PROTO: i16 = 28;
    pub const DATA: i16 = 76;
    pub const DATA_END: i16 = 80;
}

/// Helper function ids (uapi `__BPF_FUNC_MAPPER` order).
mod helper {
    pub const SKB_VLAN_PUSH: i32 = 18;
    pub const SKB_VLAN_POP: i32 = 19;
    pub const REDIRECT: i32 = 23;
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub fn encode(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = (self.dst & 0xf) | (self.src << 4);
        b[2..4].copy_from_slice(&self.off.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b
    }
}

// Opcodes used here.
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const AND64_K: u8 = 0x57;
const TO_BE: u8 = 0xdc; // BPF_ALU | BPF_END | BPF_TO_BE
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_X: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;

/// A forward-referencable jump target.
#[derive(Clone, Copy)]
struct Label(usize);

/// Just enough of an assembler: instructions plus jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    fn here(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }
    fn ret(&mut self, value: i32) {
        self.op(MOV64_K, 0, 0, 0, value);
        self.op(EXIT, 0, 0, 0, 0);
    }
    /// `return bpf_redirect(ifindex, 0)`: to the device's egress.
    fn redirect(&mut self, ifindex: u32) {
        self.op(MOV64_K, 1, 0, 0, ifindex as i32);
        self.op(MOV64_K, 2, 0, 0, 0);
        self.op(CALL, 0, 0, 0, helper::REDIRECT);
        self.op(EXIT, 0, 0, 0, 0);
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, l) in self.fixups {
            // Every label is placed by the generators below; an unplaced one would be a bug here.
            let target = self.labels[l.0].unwrap_or(at + 1);
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// `htons(ETH_P_8021Q)` as the program compares it (loads are in host order).
fn be_8021q() -> i32 {
    i32::from(ETH_P_8021Q.to_be())
}

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
    a.jump(JNE_K, 2, 0, be_8021q(), drop);
    a.op(LDX_W, 2, 6, skb::VLAN_TCI, 0);
    a.op(AND64_K, 2, 0, 0, 0x0fff);
    a.jump(JA, 0, 0, 0, dispatch);

    a.here(in_data);
    a.op(LDX_W, 2, 6, skb::DATA, 0);
    a.op(LDX_W, 3, 6, skb::DATA_END, 0);
    a.op(MOV64_X, 4, 2, 0, 0);
    a.op(ADD64_K, 4, 0, 0, 18);
    a.jump(JGT_X, 4, 3, 0, pass);
    a.op(LDX_H, 4, 2, 12, 0);
    a.jump(JNE_K, 4, 0, be_8021q(), pass);
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
    a.op(MOV64_K, 2, 0, 0, be_8021q());
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

fn ifindex(dev: &str) -> Result<u32, KernelError> {
    let name = CString::new(dev).map_err(|_| KernelError::InvalidName(dev.to_string()))?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        return Err(KernelError::NoDevice(dev.to_string()));
    }
    Ok(i)
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
        attach(&s.dev, &subport_program(s.vlan, parent))?;
    }
    attach(&w.parent_dev, &parent_program(&pairs))
}

/// Removes our programs from the trunk's devices; devices already gone count as done.
pub fn remove(w: &TrunkWiring) -> Result<(), KernelError> {
    detach(&w.parent_dev)?;
    remove_subports(w)
}

/// Removes our programs from `w`'s subport devices only (subports leaving a trunk that stays).
pub fn remove_subports(w: &TrunkWiring) -> Result<(), KernelError> {
    for s in &w.subports {
        detach(&s.dev)?;
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

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `enum bpf_attach_type` (Linux 6.6+).
const BPF_TCX_INGRESS: u32 = 46;
/// How [`attached`] and [`remove`] recognise our programs.
const PROG_NAME: [u8; 16] = *b"isthmus_vlan\0\0\0\0";

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// Loads a program; on refusal the error carries the verifier's log.
fn load(insns: &[Insn]) -> Result<OwnedFd, KernelError> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.encode()).collect();
    // The project's own: none of the helpers used is GPL-only (checked on 6.18).
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let name = PROG_NAME;
    let load_with = |log_level: u32, log: &mut [u8]| {
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size: if log_level > 0 { log.len() as u32 } else { 0 },
            log_buf: if log_level > 0 { log.as_mut_ptr() as u64 } else { 0 },
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
        };
        // SAFETY: attr points at live buffers (code, license, log) for the call's duration.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoadAttr,
                std::mem::size_of::<ProgLoadAttr>(),
            )
        }
    };
    let fd = load_with(0, &mut log);
    if fd >= 0 {
        // SAFETY: a fresh descriptor the kernel just gave us.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let first = std::io::Error::last_os_error();
    // Again with the verifier's log, to say why.
    let _ = load_with(1, &mut log);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
    Err(KernelError::io(
        "loading the VLAN tc program (bpf PROG_LOAD)",
        std::io::Error::new(first.kind(), format!("{first}; verifier: {text}")),
    ))
}

#[repr(C)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Loads `insns` and runs them once on `frame` (`BPF_PROG_TEST_RUN`): the verdict and the frame
/// as the program left it. The kernel hands the frame over as is, so a tag stays in the data:
/// this exercises the path the receive path itself rarely takes.
pub fn test_run(insns: &[Insn], frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
    let fd = load(insns)?;
    let mut out = vec![0u8; frame.len() + 64];
    let mut attr = TestRunAttr {
        prog_fd: fd.as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        duration: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr, "bpf PROG_TEST_RUN")?;
    out.truncate((attr.data_size_out as usize).min(out.len()));
    Ok((attr.retval as i32, out))
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T, what: &str) -> Result<i64, KernelError> {
    // SAFETY: every attr struct here is repr(C), matches the kernel's layout for `cmd` and
    // points only at buffers that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        return Err(KernelError::io(what.to_string(), std::io::Error::last_os_error()));
    }
    Ok(rc)
}

#[repr(C)]
struct AttachAttr {
    target_ifindex: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
    expected_revision: u64,
}

#[repr(C)]
struct QueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

#[repr(C)]
struct GetFdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_prog_info` up to the name: `id` at 4, `name` at 64..80.
const INFO_LEN: usize = 80;

/// A program's id and name.
fn prog_info(fd: &OwnedFd) -> Result<(u32, [u8; 16]), KernelError> {
    let mut info = [0u8; INFO_LEN];
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: INFO_LEN as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr, "bpf OBJ_GET_INFO_BY_FD")?;
    let id = u32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
    let mut name = [0u8; 16];
    name.copy_from_slice(&info[64..80]);
    Ok((id, name))
}

/// Our programs on `ifindex`'s tcx ingress, as open descriptors with their ids.
fn ours(ifindex: u32) -> Result<Vec<(u32, OwnedFd)>, KernelError> {
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: 0,
        link_attach_flags: 0,
        revision: 0,
    };
    bpf(BPF_PROG_QUERY, &mut attr, "bpf PROG_QUERY (tcx ingress)")?;
    let mut out = Vec::new();
    for &prog_id in &ids[..(attr.prog_cnt as usize).min(ids.len())] {
        let mut get = GetFdAttr {
            prog_id,
            next_id: 0,
            open_flags: 0,
        };
        let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut get, "bpf PROG_GET_FD_BY_ID") {
            Ok(fd) => {
                // SAFETY: a fresh descriptor the kernel just gave us.
                unsafe { OwnedFd::from_raw_fd(fd as i32) }
            }
            // Detached meanwhile.
            Err(_) => continue,
        };
        if prog_info(&fd)?.1 == PROG_NAME {
            out.push((prog_id, fd));
        }
    }
    Ok(out)
}

fn tcx(cmd: libc::c_long, ifindex: u32, prog: &OwnedFd, what: &str) -> Result<(), KernelError> {
    let mut attr = AttachAttr {
        target_ifindex: ifindex,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TCX_INGRESS,
        attach_flags: 0,
        replace_bpf_fd: 0,
        relative_fd: 0,
        expected_revision: 0,
    };
    bpf(cmd, &mut attr, what).map(|_| ())
}

/// Attaches the program to `dev`'s tcx ingress, then detaches the ones it replaces (until
/// then they run first, so no frame meets neither).
fn attach(dev: &str, insns: &[Insn]) -> Result<(), KernelError> {
    let ifindex = ifindex(dev)?;
    let fd = load(insns)?;
    let (id, _) = prog_info(&fd)?;
    tcx(
        BPF_PROG_ATTACH,
        ifindex,
        &fd,
        &format!("attaching the VLAN program to {dev} (tcx ingress)"),
    )?;
    for (old, old_fd) in ours(ifindex)? {
        if old != id {
            tcx(
                BPF_PROG_DETACH,
                ifindex,
                &old_fd,
                &format!("detaching an old VLAN program from {dev}"),
            )?;
        }
    }
    Ok(())
}

fn detach(dev: &str) -> Result<(), KernelError> {
    let ifindex = match ifindex(dev) {
        Ok(i) => i,
        Err(KernelError::NoDevice(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for (_, fd) in ours(ifindex)? {
        match tcx(
            BPF_PROG_DETACH,
            ifindex,
            &fd,
            &format!("detaching the VLAN program from {dev}"),
        ) {
            // Detached by someone else meanwhile.
            Err(KernelError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    Ok(())
}

/// How many of our programs are on `dev`'s ingress (0 or 1 unless something went wrong).
pub fn attached(dev: &str) -> Result<usize, KernelError> {
    Ok(ours(ifindex(dev)?)?.len())
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
                .map(|(vlan, dev)| Subport { vlan, dev: dev.into() })
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
