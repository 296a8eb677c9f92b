//! The ZEO 5 handshake and the `(msgid, flag, name, args)` message tuple.

use crate::{msgpack, pickle, DecodeError, Limits, Value};
use bytes::Bytes;

/// The only protocol version ZEO 5 and 6 speak.
pub const PROTOCOL_VERSION: &[u8] = b"5";

/// Method name of replies.
pub const REPLY: &str = ".reply";

/// The two marshallings. The server picks one and announces it with the first frame;
/// the client echoes it and follows it from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Pickle protocol 3, announced as `Z5` (the Python server's default).
    Pickle,
    /// msgpack, announced as `M5`.
    Msgpack,
}

impl Encoding {
    /// The 2-byte protocol frame the server sends on accept.
    pub fn server_hello(self) -> &'static [u8] {
        match self {
            Encoding::Pickle => b"Z5",
            Encoding::Msgpack => b"M5",
        }
    }

    pub fn letter(self) -> u8 {
        match self {
            Encoding::Pickle => b'Z',
            Encoding::Msgpack => b'M',
        }
    }

    pub fn encode(self, v: &Value) -> Vec<u8> {
        match self {
            Encoding::Pickle => pickle::to_vec(v),
            Encoding::Msgpack => msgpack::to_vec(v),
        }
    }

    /// Encodes `v` as a complete frame (length prefix included), in one buffer: replies
    /// are built straight into what the socket writer sends. Panics if the encoding is
    /// 4 GiB or more, as [`crate::frame::encode_frame`] does.
    pub fn encode_framed(self, v: &Value) -> Bytes {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&[0; 4]);
        match self {
            Encoding::Pickle => pickle::encode(v, &mut out),
            Encoding::Msgpack => msgpack::encode(v, &mut out),
        }
        let len = crate::frame::frame_len(out.len() - 4);
        out[..4].copy_from_slice(&len.to_be_bytes());
        Bytes::from(out)
    }

    pub fn decode(self, input: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
        match self {
            Encoding::Pickle => pickle::decode(input, limits),
            Encoding::Msgpack => msgpack::decode(input, limits),
        }
    }
}

/// What a client's first frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientHello {
    /// `ruok`: a monitoring probe; answer with the status JSON and close.
    Ruok,
    /// A protocol choice, e.g. `Z5`. The letter picks the marshalling for the connection.
    Protocol(Encoding),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad handshake {0:?}")]
pub struct HandshakeError(pub String);

/// Parses the client's first frame. Like the Python server, the encoding is taken from
/// the letter the client sent; stock clients always echo the server's.
pub fn parse_client_hello(frame: &[u8]) -> Result<ClientHello, HandshakeError> {
    if frame == b"ruok" {
        return Ok(ClientHello::Ruok);
    }
    let bad = || HandshakeError(String::from_utf8_lossy(frame).into_owned());
    if frame.len() < 2 || &frame[1..] != PROTOCOL_VERSION {
        return Err(bad());
    }
    match frame[0] {
        b'Z' => Ok(ClientHello::Protocol(Encoding::Pickle)),
        b'M' => Ok(ClientHello::Protocol(Encoding::Msgpack)),
        _ => Err(bad()),
    }
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Opaque: an int for most calls, an `(oid, tid)` tuple for `loadBefore`; echoed as is.
    pub msgid: Value,
    /// Client to server: one-way call. Server to client: a callback or an exception reply
    /// (see [`Message::is_exception`]).
    pub flag: Value,
    pub name: String,
    pub args: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
    #[error("a message must be a 4-tuple (msgid, flag, name, args)")]
    Shape,
}

impl Message {
    pub fn decode(
        encoding: Encoding,
        payload: &[u8],
        limits: &Limits,
    ) -> Result<Message, MessageError> {
        let v = encoding.decode(payload, limits)?;
        let items = match v {
            Value::Tuple(items) | Value::List(items) if items.len() == 4 => items,
            _ => return Err(MessageError::Shape),
        };
        let mut it = items.into_iter();
        let msgid = it.next().unwrap_or(Value::None);
        let flag = it.next().unwrap_or(Value::None);
        let name = match it.next() {
            Some(Value::Str(s)) => s,
            Some(Value::Bytes(b)) => {
                String::from_utf8(b.to_vec()).map_err(|_| MessageError::Shape)?
            }
            _ => return Err(MessageError::Shape),
        };
        let args = it.next().unwrap_or(Value::None);
        Ok(Message {
            msgid,
            flag,
            name,
            args,
        })
    }

    /// A client call is one-way when its flag is true.
    pub fn is_oneway(&self) -> bool {
        self.flag.truthy()
    }

    /// The heartbeat `(-1, 0, '.reply', None)` that clients send every 60 s.
    pub fn is_heartbeat(&self) -> bool {
        self.msgid == Value::Int(-1)
    }

    /// A reply carrying an exception (flag 2).
    pub fn is_exception(&self) -> bool {
        self.name == REPLY && self.flag == Value::Int(2)
    }

    pub fn encode(&self, encoding: Encoding) -> Bytes {
        Bytes::from(encoding.encode(&Value::Tuple(vec![
            self.msgid.clone(),
            self.flag.clone(),
            Value::Str(self.name.clone()),
            self.args.clone(),
        ])))
    }
}

/// Encodes a normal reply `(msgid, 0, '.reply', result)`.
pub fn encode_reply(encoding: Encoding, msgid: &Value, result: Value) -> Vec<u8> {
    encoding.encode(&Value::Tuple(vec![
        msgid.clone(),
        Value::Int(0),
        Value::str(REPLY),
        result,
    ]))
}

/// Encodes an exception reply `(msgid, 2, '.reply', (class_path, payload))`.
pub fn encode_exception(
    encoding: Encoding,
    msgid: &Value,
    class_path: &str,
    payload: Value,
) -> Vec<u8> {
    encoding.encode(&Value::Tuple(vec![
        msgid.clone(),
        Value::Int(2),
        Value::str(REPLY),
        Value::Tuple(vec![Value::str(class_path), payload]),
    ]))
}

/// Encodes a server-to-client callback `(0, True, name, args)`.
pub fn encode_callback(encoding: Encoding, name: &str, args: Vec<Value>) -> Vec<u8> {
    encoding.encode(&Value::Tuple(vec![
        Value::Int(0),
        Value::Bool(true),
        Value::str(name),
        Value::Tuple(args),
    ]))
}

/// [`encode_reply`] as a ready-to-send frame.
pub fn reply_frame(encoding: Encoding, msgid: &Value, result: Value) -> Bytes {
    encoding.encode_framed(&Value::Tuple(vec![
        msgid.clone(),
        Value::Int(0),
        Value::str(REPLY),
        result,
    ]))
}

/// [`encode_exception`] as a ready-to-send frame.
pub fn exception_frame(
    encoding: Encoding,
    msgid: &Value,
    class_path: &str,
    payload: Value,
) -> Bytes {
    encoding.encode_framed(&Value::Tuple(vec![
        msgid.clone(),
        Value::Int(2),
        Value::str(REPLY),
        Value::Tuple(vec![Value::str(class_path), payload]),
    ]))
}

/// [`encode_callback`] as a ready-to-send frame.
pub fn callback_frame(encoding: Encoding, name: &str, args: Vec<Value>) -> Bytes {
    encoding.encode_framed(&Value::Tuple(vec![
        Value::Int(0),
        Value::Bool(true),
        Value::str(name),
        Value::Tuple(args),
    ]))
}

/// Encodes a client call `(msgid, oneway, name, args)`.
pub fn encode_call(
    encoding: Encoding,
    msgid: &Value,
    oneway: bool,
    name: &str,
    args: Vec<Value>,
) -> Vec<u8> {
    encoding.encode(&Value::Tuple(vec![
        msgid.clone(),
        Value::Bool(oneway),
        Value::str(name),
        Value::Tuple(args),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello() {
        assert_eq!(
            parse_client_hello(b"Z5"),
            Ok(ClientHello::Protocol(Encoding::Pickle))
        );
        assert_eq!(
            parse_client_hello(b"M5"),
            Ok(ClientHello::Protocol(Encoding::Msgpack))
        );
        assert_eq!(parse_client_hello(b"ruok"), Ok(ClientHello::Ruok));
        assert!(parse_client_hello(b"Z4").is_err());
        assert!(parse_client_hello(b"X5").is_err());
        assert!(parse_client_hello(b"").is_err());
    }

    #[test]
    fn register_request_round_trips_in_both_encodings() {
        for enc in [Encoding::Pickle, Encoding::Msgpack] {
            let bytes = encode_call(
                enc,
                &Value::Int(1),
                false,
                "register",
                vec![Value::str("1"), Value::Int(0)],
            );
            let m = Message::decode(enc, &bytes, &Limits::default()).unwrap();
            assert_eq!(m.name, "register");
            assert!(!m.is_oneway());
            assert_eq!(m.args.as_seq().unwrap(), &[Value::str("1"), Value::Int(0)]);
        }
    }

    #[test]
    fn heartbeat_of_zeo_50_clients() {
        // Old-style pickle: no PROTO, SHORT_BINSTRING method name.
        let raw = [
            0x28, 0x4a, 0xff, 0xff, 0xff, 0xff, 0x4b, 0x00, 0x55, 0x06, 0x2e, 0x72, 0x65, 0x70,
            0x6c, 0x79, 0x4e, 0x74, 0x2e,
        ];
        let m = Message::decode(Encoding::Pickle, &raw, &Limits::default()).unwrap();
        assert!(m.is_heartbeat());
    }

    #[test]
    fn framed_encoding_matches_frame_of_encode() {
        for enc in [Encoding::Pickle, Encoding::Msgpack] {
            let v = Value::Tuple(vec![
                Value::Int(7),
                Value::Int(0),
                Value::str(REPLY),
                Value::bytes(vec![1u8; 300]),
            ]);
            assert_eq!(enc.encode_framed(&v), crate::frame::frame(&enc.encode(&v)));
            assert_eq!(
                reply_frame(enc, &Value::Int(1), Value::None),
                crate::frame::frame(&encode_reply(enc, &Value::Int(1), Value::None))
            );
        }
    }

    #[test]
    fn not_a_tuple_is_an_error() {
        let bytes = Encoding::Pickle.encode(&Value::Int(3));
        assert!(matches!(
            Message::decode(Encoding::Pickle, &bytes, &Limits::default()),
            Err(MessageError::Shape)
        ));
    }
}
