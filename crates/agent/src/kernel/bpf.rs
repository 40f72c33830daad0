//! Just enough eBPF for the agent's tc programs, without clang or maps: an assembler for
//! straight-line programs with forward jumps (values baked in as immediates), and `bpf(2)`
//! calls to load programs and attach them to a device's tcx ingress (Linux 6.6+), which runs
//! before the classic tc ingress filters. Each kind of program has its own name, by which the
//! agent finds (and replaces or removes) its own programs and leaves anyone else's alone.
//! Device names resolve in the calling thread's network namespace.

use super::KernelError;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// tc verdicts.
pub(super) const TC_ACT_UNSPEC: i32 = -1;
pub(super) const TC_ACT_SHOT: i32 = 2;
/// What `bpf_redirect` returns (and `PROG_TEST_RUN` reports) on success.
pub const TC_ACT_REDIRECT: i32 = 7;

/// Offsets in `struct __sk_buff` (uapi `linux/bpf.h`).
pub(super) mod skb {
    pub const VLAN_PRESENT: i16 = 20;
    pub const VLAN_TCI: i16 = 24;
    pub const VLAN_PROTO: i16 = 28;
    pub const DATA: i16 = 76;
    pub const DATA_END: i16 = 80;
}

/// Helper function ids (uapi `__BPF_FUNC_MAPPER` order).
pub(super) mod helper {
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
pub(super) const MOV64_X: u8 = 0xbf;
pub(super) const MOV64_K: u8 = 0xb7;
pub(super) const ADD64_K: u8 = 0x07;
pub(super) const AND64_K: u8 = 0x57;
pub(super) const TO_BE: u8 = 0xdc; // BPF_ALU | BPF_END | BPF_TO_BE
pub(super) const LDX_W: u8 = 0x61;
pub(super) const LDX_H: u8 = 0x69;
pub(super) const LDX_B: u8 = 0x71;
/// `BPF_JMP32 | BPF_JNE | BPF_K`: compares the low 32 bits with the immediate as is.
pub(super) const JNE32_K: u8 = 0x56;
pub(super) const JA: u8 = 0x05;
pub(super) const JEQ_K: u8 = 0x15;
pub(super) const JNE_K: u8 = 0x55;
pub(super) const JGT_X: u8 = 0x2d;
pub(super) const CALL: u8 = 0x85;
pub(super) const EXIT: u8 = 0x95;

/// A forward-referencable jump target.
#[derive(Clone, Copy)]
pub(super) struct Label(usize);

/// Just enough of an assembler: instructions plus jumps to labels resolved at the end.
#[derive(Default)]
pub(super) struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    pub(super) fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }
    pub(super) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    pub(super) fn here(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }
    pub(super) fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }
    pub(super) fn ret(&mut self, value: i32) {
        self.op(MOV64_K, 0, 0, 0, value);
        self.op(EXIT, 0, 0, 0, 0);
    }
    /// `return bpf_redirect(ifindex, 0)`: to the device's egress.
    pub(super) fn redirect(&mut self, ifindex: u32) {
        self.op(MOV64_K, 1, 0, 0, ifindex as i32);
        self.op(MOV64_K, 2, 0, 0, 0);
        self.op(CALL, 0, 0, 0, helper::REDIRECT);
        self.op(EXIT, 0, 0, 0, 0);
    }
    /// The frame prologue both kinds of program share: r2 = the frame's start (context in
    /// `ctx`) and r4 = its EtherType, or a jump to `short` when the frame has fewer than `len`
    /// bytes (the verifier needs that bound before any load from the frame). Clobbers r3.
    pub(super) fn ethertype_of_frame(&mut self, ctx: u8, len: i32, short: Label) {
        self.op(LDX_W, 2, ctx, skb::DATA, 0);
        self.op(LDX_W, 3, ctx, skb::DATA_END, 0);
        self.op(MOV64_X, 4, 2, 0, 0);
        self.op(ADD64_K, 4, 0, 0, len);
        self.jump(JGT_X, 4, 3, 0, short);
        self.op(LDX_H, 4, 2, 12, 0);
    }
    pub(super) fn finish(mut self) -> Vec<Insn> {
        for (at, l) in self.fixups {
            // Every label is placed by the generators below; an unplaced one would be a bug here.
            let target = self.labels[l.0].unwrap_or(at + 1);
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// An EtherType as a halfword load from the frame yields it (loads are in host order).
pub(super) fn ethertype(t: u16) -> i32 {
    i32::from(u16::from_ne_bytes(t.to_be_bytes()))
}

pub(super) fn ifindex(dev: &str) -> Result<u32, KernelError> {
    let name = CString::new(dev).map_err(|_| KernelError::InvalidName(dev.to_string()))?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if i == 0 {
        return Err(KernelError::NoDevice(dev.to_string()));
    }
    Ok(i)
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
/// A kind of program, by the name the kernel keeps for it (at most 15 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub name: [u8; 16],
    /// For error messages.
    pub what: &'static str,
}

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
fn load(kind: Kind, insns: &[Insn]) -> Result<OwnedFd, KernelError> {
    let code: Vec<u8> = insns.iter().flat_map(|i| i.encode()).collect();
    // The project's own: none of the helpers used is GPL-only (checked on 6.18).
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let name = kind.name;
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
        format!("loading the {} tc program (bpf PROG_LOAD)", kind.what),
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
pub fn test_run(kind: Kind, insns: &[Insn], frame: &[u8]) -> Result<(i32, Vec<u8>), KernelError> {
    let fd = load(kind, insns)?;
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
fn ours(kind: Kind, ifindex: u32) -> Result<Vec<(u32, OwnedFd)>, KernelError> {
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
        if prog_info(&fd)?.1 == kind.name {
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

/// Attaches the program (of `kind`) to `dev`'s tcx ingress, then detaches the ones it replaces (until
/// then they run first, so no frame meets neither).
pub fn attach(kind: Kind, dev: &str, insns: &[Insn]) -> Result<(), KernelError> {
    let ifindex = ifindex(dev)?;
    let fd = load(kind, insns)?;
    let (id, _) = prog_info(&fd)?;
    tcx(
        BPF_PROG_ATTACH,
        ifindex,
        &fd,
        &format!("attaching the {} program to {dev} (tcx ingress)", kind.what),
    )?;
    for (old, old_fd) in ours(kind, ifindex)? {
        if old != id {
            tcx(
                BPF_PROG_DETACH,
                ifindex,
                &old_fd,
                &format!("detaching an old {} program from {dev}", kind.what),
            )?;
        }
    }
    Ok(())
}

pub fn detach(kind: Kind, dev: &str) -> Result<(), KernelError> {
    let ifindex = match ifindex(dev) {
        Ok(i) => i,
        Err(KernelError::NoDevice(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    for (_, fd) in ours(kind, ifindex)? {
        match tcx(
            BPF_PROG_DETACH,
            ifindex,
            &fd,
            &format!("detaching the {} program from {dev}", kind.what),
        ) {
            // Detached by someone else meanwhile.
            Err(KernelError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    Ok(())
}

/// How many of our programs are on `dev`'s ingress (0 or 1 unless something went wrong).
pub fn attached(kind: Kind, dev: &str) -> Result<usize, KernelError> {
    Ok(ours(kind, ifindex(dev)?)?.len())
}
