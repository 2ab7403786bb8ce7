//! Reading the kernel's answers: ACKs, single replies and dumps.
//!
//! Pure functions over the list of messages that came back for one request, so that the rules
//! (what counts as an ACK, when a dump is complete, when it was interrupted) are unit-tested
//! without a kernel.
//!
//! Dumps: the kernel builds a dump in several chunks; if the table changes between two chunks
//! it sets `NLM_F_DUMP_INTR` on the messages sent after the change, *including* the final
//! `NLMSG_DONE`. rtnetlink 0.24 drops the header flags (its `get()` streams yield only the inner
//! messages) and netlink-proto swallows `NLMSG_DONE` by default, so an interrupted dump would go
//! unnoticed. The connection is therefore set to forward `NLMSG_DONE` and ACKs
//! (see `Netlink::connect_in`), and the dump is read here, headers included.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP_INTR};

use crate::message::RtMessage;
use crate::NetError;

pub(crate) type Msg = NetlinkMessage<RtMessage>;

/// Why a request failed, before the caller adds what it was doing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Kernel { errno: i32, extack: Option<String> },
    Closed,
    Interrupted { attempts: u32 },
    Unexpected(String),
}

impl Failure {
    pub(crate) fn context(self, what: impl Into<String>) -> NetError {
        let what = what.into();
        match self {
            Self::Kernel { errno, extack } => NetError::Netlink { what, errno, extack },
            Self::Closed => NetError::ConnectionClosed { what },
            Self::Interrupted { attempts } => NetError::DumpInterrupted { what, attempts },
            Self::Unexpected(detail) => NetError::UnexpectedReply { what, detail },
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Kernel { errno, .. }
            if matches!(*errno, libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL))
    }
}

/// The answer to a request sent with `NLM_F_ACK`.
pub(crate) fn ack(replies: Vec<Msg>) -> Result<(), Failure> {
    for reply in replies {
        let (header, payload) = reply.into_parts();
        if let NetlinkPayload::Error(err) = payload {
            return kernel_result(&header, err.code, &err.header);
        }
    }
    Err(Failure::Closed)
}

/// The answer to a non-dump `RTM_GET*`: exactly one message, or an error.
pub(crate) fn single(replies: Vec<Msg>) -> Result<RtMessage, Failure> {
    for reply in replies {
        let (header, payload) = reply.into_parts();
        match payload {
            NetlinkPayload::InnerMessage(msg) => return Ok(msg),
            NetlinkPayload::Error(err) => kernel_result(&header, err.code, &err.header)?,
            _ => {}
        }
    }
    Err(Failure::Closed)
}

/// The answer to an `NLM_F_DUMP` request: every message, unless the dump was interrupted
/// (`Failure::Interrupted`, to be retried) or cut short.
pub(crate) fn dump(replies: Vec<Msg>) -> Result<Vec<RtMessage>, Failure> {
    let mut out = Vec::with_capacity(replies.len());
    let mut interrupted = false;
    let mut done = false;
    for reply in replies {
        let (header, payload) = reply.into_parts();
        interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
        match payload {
            NetlinkPayload::InnerMessage(msg) => out.push(msg),
            NetlinkPayload::Done(d) if d.code != 0 => {
                return Err(Failure::Kernel {
                    errno: d.code.abs(),
                    extack: None,
                });
            }
            NetlinkPayload::Done(_) => done = true,
            NetlinkPayload::Error(err) => kernel_result(&header, err.code, &err.header)?,
            // Messages were lost: as good as interrupted.
            NetlinkPayload::Overrun(_) => interrupted = true,
            _ => {}
        }
    }
    if interrupted {
        return Err(Failure::Interrupted { attempts: 1 });
    }
    if !done {
        return Err(Failure::Closed);
    }
    Ok(out)
}

fn kernel_result(header: &NetlinkHeader, code: Option<std::num::NonZeroI32>, payload: &[u8]) -> Result<(), Failure> {
    match code {
        None => Ok(()),
        Some(code) => Err(Failure::Kernel {
            errno: code.get().abs(),
            extack: extack_message(header.flags, payload),
        }),
    }
}

const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// The human-readable message of an extended ACK (`NLMSGERR_ATTR_MSG`), if the kernel sent one.
/// `payload` is what follows the error code: the original request (only its header when
/// `NLM_F_CAPPED`), then the TLVs when `NLM_F_ACK_TLVS`.
pub(crate) fn extack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let mut off = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        align4(u32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?) as usize)
    };
    while off + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[off], payload[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[off + 2], payload[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let value = &payload[off + 4..off + len];
            let text = value.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        off += align4(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};
    use netlink_packet_route::link::LinkMessage;
    use netlink_packet_route::RouteNetlinkMessage;

    use super::*;

    fn inner(flags: u16) -> Msg {
        let mut m = NetlinkMessage::from(RtMessage::Route(RouteNetlinkMessage::NewLink(LinkMessage::default())));
        m.header.flags = flags;
        m
    }

    fn done(flags: u16) -> Msg {
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Done(DoneMessage::default()));
        m.header.flags = flags;
        m
    }

    fn error(code: i32, flags: u16, payload: Vec<u8>) -> Msg {
        let mut err = ErrorMessage::default();
        err.code = NonZeroI32::new(code);
        err.header = payload;
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Error(err));
        m.header.flags = flags;
        m
    }

    #[test]
    fn complete_dump_returns_every_message() {
        let replies = vec![inner(NLM_F_MULTIPART), inner(NLM_F_MULTIPART), done(NLM_F_MULTIPART)];
        assert_eq!(dump(replies).unwrap().len(), 2);
    }

    #[test]
    fn dump_intr_on_a_message_or_on_done_is_an_interruption() {
        let on_msg = vec![inner(NLM_F_MULTIPART | NLM_F_DUMP_INTR), done(NLM_F_MULTIPART)];
        assert_eq!(dump(on_msg), Err(Failure::Interrupted { attempts: 1 }));
        let on_done = vec![inner(NLM_F_MULTIPART), done(NLM_F_MULTIPART | NLM_F_DUMP_INTR)];
        assert_eq!(dump(on_done), Err(Failure::Interrupted { attempts: 1 }));
    }

    #[test]
    fn dump_without_done_is_a_closed_connection() {
        assert_eq!(dump(vec![inner(NLM_F_MULTIPART)]), Err(Failure::Closed));
    }

    #[test]
    fn ack_and_nack() {
        assert_eq!(ack(vec![error(0, 0, vec![0; 16])]), Ok(()));
        assert_eq!(ack(vec![]), Err(Failure::Closed));
        let nack = ack(vec![error(-libc::EEXIST, 0, vec![0; 16])]).unwrap_err();
        assert_eq!(
            nack,
            Failure::Kernel {
                errno: libc::EEXIST,
                extack: None
            }
        );
    }

    #[test]
    fn extack_message_is_read_from_capped_and_full_errors() {
        let mut tlv = Vec::new();
        let text = b"Nexthop has invalid gateway\0";
        tlv.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        tlv.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        tlv.extend_from_slice(text);
        tlv.resize(align4(tlv.len()), 0);

        let mut capped = 20u32.to_ne_bytes().to_vec(); // original length says 20, but capped to 16
        capped.resize(NLMSG_HDRLEN, 0);
        capped.extend_from_slice(&tlv);
        let reply = error(-libc::EINVAL, NLM_F_CAPPED | NLM_F_ACK_TLVS, capped);
        let Err(Failure::Kernel { extack, .. }) = ack(vec![reply]) else {
            panic!("expected a NACK")
        };
        assert_eq!(extack.as_deref(), Some("Nexthop has invalid gateway"));

        let mut full = 22u32.to_ne_bytes().to_vec(); // 22 bytes of request, padded to 24
        full.resize(24, 0);
        full.extend_from_slice(&tlv);
        assert_eq!(
            extack_message(NLM_F_ACK_TLVS, &full).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(extack_message(0, &full), None);
    }
}
