//! The device-link frame codec: a 4-byte big-endian length, then one protobuf message.
//!
//! This is the only code on the device link that sees raw bytes. The length is checked against a hard
//! limit before any buffering, so a hostile peer cannot make the node allocate more than one frame.

use std::io;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use courier_proto::device::GoodbyeReason;
use tokio_util::codec::{Decoder, Encoder};

const LENGTH_PREFIX: usize = 4;

/// Buffer capacity an idle link may keep; larger empty buffers are freed (see `lean`).
const IDLE_BUFFER: usize = 512;

/// Wraps `io` for frames with no buffers allocated up front: tokio-util's default is 8 KiB each for reading
/// and writing, which for a link that is idle nearly all the time is most of what it costs. Call
/// `release_idle_buffers` whenever the link goes back to waiting.
pub fn lean<T, U>(io: T, codec: U) -> tokio_util::codec::Framed<T, U> {
    let mut framed = tokio_util::codec::Framed::with_capacity(io, codec, 0);
    *framed.write_buffer_mut() = BytesMut::new();
    framed
}

/// Frees a link's read and write buffers when they hold nothing and have grown past a few hundred bytes,
/// so a burst of traffic does not leave an idle link holding its high-water mark.
pub fn release_idle_buffers<T, U>(framed: &mut tokio_util::codec::Framed<T, U>) {
    let read = framed.read_buffer_mut();
    if read.is_empty() && read.capacity() > IDLE_BUFFER {
        *read = BytesMut::new();
    }
    let write = framed.write_buffer_mut();
    if write.is_empty() && write.capacity() > IDLE_BUFFER {
        *write = BytesMut::new();
    }
}

/// The default hard limit on one frame's body, in bytes. A 5 KiB VoIP payload plus headers fits easily.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame does not decode: {0}")]
    Malformed(#[from] prost::DecodeError),
    #[error("link I/O: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// The reason to give the peer before closing, if the link can still carry one.
    pub fn goodbye_reason(&self) -> Option<GoodbyeReason> {
        match self {
            FrameError::TooLarge { .. } => Some(GoodbyeReason::FrameTooLarge),
            FrameError::Malformed(_) => Some(GoodbyeReason::MalformedFrame),
            FrameError::Io(_) => None,
        }
    }
}

/// Decodes `In` messages and encodes any message, each as one length-prefixed frame.
#[derive(Debug)]
pub struct FrameCodec<In> {
    max_frame: usize,
    _decodes: PhantomData<fn() -> In>,
}

impl<In> FrameCodec<In> {
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame, _decodes: PhantomData }
    }
}

impl<In: prost::Message + Default> Decoder for FrameCodec<In> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        let Some(prefix) = src.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if src.len() < LENGTH_PREFIX + len {
            src.reserve(LENGTH_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let body = src.split_to(len).freeze();
        Ok(Some(In::decode(body)?))
    }
}

impl<In, Out: prost::Message> Encoder<Out> for FrameCodec<In> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = item.encoded_len();
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u32(len as u32);
        item.encode(dst).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(())
    }
}

/// A frame encoded once, length prefix included, to be written as is on many links (a broadcast goes to
/// every subscriber byte for byte the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame(pub bytes::Bytes);

impl EncodedFrame {
    pub fn encode<M: prost::Message>(message: &M) -> Self {
        let len = message.encoded_len();
        let mut bytes = BytesMut::with_capacity(LENGTH_PREFIX + len);
        bytes.put_u32(len as u32);
        message.encode_raw(&mut bytes);
        EncodedFrame(bytes.freeze())
    }
}

impl<In> Encoder<EncodedFrame> for FrameCodec<In> {
    type Error = FrameError;

    fn encode(&mut self, item: EncodedFrame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = item.0.len().saturating_sub(LENGTH_PREFIX);
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        dst.extend_from_slice(&item.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::device::{DeviceFrame, Ping, device_frame};

    fn ping(nonce: u64) -> DeviceFrame {
        DeviceFrame { kind: Some(device_frame::Kind::Ping(Ping { nonce })) }
    }

    #[test]
    fn a_frame_encoded_once_is_the_same_bytes_as_one_encoded_per_link() {
        let mut codec = FrameCodec::<DeviceFrame>::new(64);
        let (mut direct, mut shared) = (BytesMut::new(), BytesMut::new());
        codec.encode(ping(9), &mut direct).unwrap();
        let once = EncodedFrame::encode(&ping(9));
        codec.encode(once.clone(), &mut shared).unwrap();
        codec.encode(once, &mut shared).unwrap();
        assert_eq!(&shared[..direct.len()], &direct[..]);
        assert_eq!(codec.decode(&mut shared).unwrap(), Some(ping(9)));
        assert_eq!(codec.decode(&mut shared).unwrap(), Some(ping(9)));
        let mut small = FrameCodec::<DeviceFrame>::new(1);
        assert!(matches!(
            small.encode(EncodedFrame::encode(&ping(9)), &mut BytesMut::new()),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn round_trips_and_waits_for_whole_frames() {
        let mut codec = FrameCodec::<DeviceFrame>::new(64);
        let mut buf = BytesMut::new();
        codec.encode(ping(7), &mut buf).unwrap();
        codec.encode(ping(8), &mut buf).unwrap();
        let whole = buf.clone();
        let mut partial = BytesMut::from(&whole[..3]);
        assert!(codec.decode(&mut partial).unwrap().is_none());
        let mut partial = BytesMut::from(&whole[..6]);
        assert!(codec.decode(&mut partial).unwrap().is_none());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ping(7)));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(ping(8)));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut codec = FrameCodec::<DeviceFrame>::new(1024);
        let mut buf = BytesMut::from(&(1u32 << 20).to_be_bytes()[..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 1_048_576, max: 1024 }));
        assert_eq!(err.goodbye_reason(), Some(GoodbyeReason::FrameTooLarge));
        assert!(buf.capacity() < 4096, "must not reserve room for the hostile frame");
        let mut max = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(codec.decode(&mut max).is_err());
    }

    #[test]
    fn garbage_bodies_are_malformed_not_panics() {
        let mut codec = FrameCodec::<DeviceFrame>::new(1024);
        for garbage in [&[0xffu8, 0xff, 0xff][..], &[0x0a, 0x05, 0x01], &[0x12, 0xff, 0xff, 0xff, 0xff, 0x0f], &[0x07]]
        {
            let mut buf = BytesMut::new();
            buf.put_u32(garbage.len() as u32);
            buf.extend_from_slice(garbage);
            let err = codec.decode(&mut buf).unwrap_err();
            assert_eq!(err.goodbye_reason(), Some(GoodbyeReason::MalformedFrame), "{garbage:?}");
        }
    }

    #[test]
    fn encoding_refuses_frames_over_the_limit() {
        let mut codec = FrameCodec::<DeviceFrame>::new(8);
        let big = courier_proto::device::ServerFrame {
            kind: Some(courier_proto::device::server_frame::Kind::Goodbye(courier_proto::device::Goodbye {
                reason: 0,
                detail: "x".repeat(100),
            })),
        };
        assert!(matches!(codec.encode(big, &mut BytesMut::new()), Err(FrameError::TooLarge { .. })));
    }
}
