//! Messages rebuilt from the frames of one connection. A message of at
//! most `max_frame` bytes is one `Data` frame; a longer one is `DataMore`
//! frames ending with a `Data` frame, all on its tag; a striped message
//! (`[network] lanes`) sends its part 0 here as `StripeMore` frames ending
//! with a `Stripe` frame, each starting with the same [`StripeHead`], and
//! its other parts on the lanes. Anything out of that order, or a message
//! growing past the connection's limit (`[network] max_message`), is an
//! error, which ends the peer: frames come from the network and are
//! checked, never trusted.

use super::frame::{Frame, FrameKind, StripeHead};

/// What one frame completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// Nothing whole yet.
    Pending,
    /// A whole message on `tag`.
    Message { tag: u64, payload: Vec<u8> },
    /// Part 0 of a striped message on `tag`, whole; its other parts come
    /// on the lanes.
    Striped {
        tag: u64,
        head: StripeHead,
        part: Vec<u8>,
    },
    /// The peer closed its transport.
    Closed,
}

/// The message in progress on one connection.
#[derive(Debug)]
pub struct Assembly {
    /// Bytes a message may reach: what one peer can make this rank hold
    /// for a message it never finishes.
    limit: usize,
    /// A message split into `DataMore` frames, waiting for its last piece.
    partial: Option<(u64, Vec<u8>)>,
    /// Part 0 of a striped message, waiting for its last frame.
    stripe: Option<(u64, StripeHead, Vec<u8>)>,
}

impl Assembly {
    /// An empty assembly refusing messages of more than `limit` bytes.
    pub fn new(limit: usize) -> Assembly {
        Assembly {
            limit,
            partial: None,
            stripe: None,
        }
    }

    /// Whether no message is half built: the next `Data` frame is a whole
    /// message by itself.
    pub fn idle(&self) -> bool {
        self.partial.is_none() && self.stripe.is_none()
    }

    /// Takes the connection's next frame; an error says what was out of
    /// place.
    pub fn take(&mut self, frame: Frame) -> Result<Assembled, String> {
        let held = match (&self.partial, &self.stripe) {
            (Some((_, pieces)), _) => pieces.len(),
            (_, Some((_, _, part))) => part.len(),
            _ => 0,
        };
        if held.saturating_add(frame.payload.len()) > self.limit {
            return Err(format!(
                "a message of more than {} bytes (network.max_message) on tag {}",
                self.limit, frame.tag
            ));
        }
        match frame.kind {
            FrameKind::Data | FrameKind::DataMore => {
                if let Some((tag, head, _)) = &self.stripe {
                    return Err(format!(
                        "a message on tag {} inside striped message {} on tag {tag}",
                        frame.tag, head.message
                    ));
                }
                let payload = match self.partial.take() {
                    None => frame.payload,
                    Some((tag, mut pieces)) if tag == frame.tag => {
                        pieces.extend_from_slice(&frame.payload);
                        pieces
                    }
                    Some((tag, _)) => {
                        return Err(format!(
                            "started a message on tag {} before finishing the one on tag {tag}",
                            frame.tag
                        ))
                    }
                };
                if frame.kind == FrameKind::DataMore {
                    self.partial = Some((frame.tag, payload));
                    return Ok(Assembled::Pending);
                }
                Ok(Assembled::Message {
                    tag: frame.tag,
                    payload,
                })
            }
            FrameKind::Stripe | FrameKind::StripeMore => {
                let Some((head, data)) = StripeHead::split(&frame.payload) else {
                    return Err("a malformed stripe frame".into());
                };
                if let Some((tag, _)) = &self.partial {
                    return Err(format!(
                        "stripe frames of message {} inside a message on tag {tag}",
                        head.message
                    ));
                }
                let (tag, mut part) = match self.stripe.take() {
                    None if head.part == 0 => (frame.tag, Vec::new()),
                    Some((tag, first, part)) if tag == frame.tag && first == head => (tag, part),
                    _ => {
                        return Err(format!(
                            "stripe frames of message {} out of place on the main connection",
                            head.message
                        ))
                    }
                };
                part.extend_from_slice(data);
                if frame.kind == FrameKind::StripeMore {
                    self.stripe = Some((tag, head, part));
                    return Ok(Assembled::Pending);
                }
                Ok(Assembled::Striped { tag, head, part })
            }
            FrameKind::Close => Ok(Assembled::Closed),
            FrameKind::Control => {
                Err("sent a control frame, which the transport does not use".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, tag: u64, payload: &[u8]) -> Frame {
        Frame {
            kind,
            tag,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn data_more_frames_join_into_one_message_on_their_tag() {
        let mut a = Assembly::new(1 << 20);
        assert_eq!(
            a.take(frame(FrameKind::DataMore, 7, b"ab")),
            Ok(Assembled::Pending)
        );
        assert_eq!(
            a.take(frame(FrameKind::Data, 7, b"c")),
            Ok(Assembled::Message {
                tag: 7,
                payload: b"abc".to_vec()
            })
        );
        assert_eq!(
            a.take(frame(FrameKind::Data, 8, b"d")),
            Ok(Assembled::Message {
                tag: 8,
                payload: b"d".to_vec()
            })
        );
    }

    #[test]
    fn a_message_interleaved_with_another_or_a_stripe_is_refused() {
        let mut a = Assembly::new(1 << 20);
        a.take(frame(FrameKind::DataMore, 7, b"ab")).unwrap();
        assert!(a.take(frame(FrameKind::Data, 8, b"c")).is_err());

        let head = StripeHead {
            message: 1,
            part: 0,
            parts: 2,
        };
        let mut striped = head.encode().to_vec();
        striped.extend_from_slice(b"xy");
        let mut a = Assembly::new(1 << 20);
        a.take(frame(FrameKind::StripeMore, 9, &striped)).unwrap();
        assert!(a.take(frame(FrameKind::Data, 9, b"c")).is_err());
        let mut a = Assembly::new(1 << 20);
        a.take(frame(FrameKind::DataMore, 9, b"c")).unwrap();
        assert!(a.take(frame(FrameKind::Stripe, 9, &striped)).is_err());
    }

    #[test]
    fn a_message_growing_past_the_limit_is_refused() {
        let mut a = Assembly::new(4);
        a.take(frame(FrameKind::DataMore, 7, b"ab")).unwrap();
        a.take(frame(FrameKind::DataMore, 7, b"cd")).unwrap();
        let err = a.take(frame(FrameKind::Data, 7, b"e")).unwrap_err();
        assert!(err.contains("more than 4 bytes"), "{err}");
        assert!(Assembly::new(4)
            .take(frame(FrameKind::Data, 8, b"12345"))
            .is_err());
        assert!(Assembly::new(4)
            .take(frame(FrameKind::Data, 8, b"1234"))
            .is_ok());
    }

    #[test]
    fn part_0_of_a_striped_message_comes_whole_with_its_head() {
        let head = StripeHead {
            message: 3,
            part: 0,
            parts: 4,
        };
        let mut first = head.encode().to_vec();
        first.extend_from_slice(b"12");
        let mut last = head.encode().to_vec();
        last.extend_from_slice(b"3");
        let mut a = Assembly::new(1 << 20);
        assert_eq!(
            a.take(frame(FrameKind::StripeMore, 5, &first)),
            Ok(Assembled::Pending)
        );
        assert_eq!(
            a.take(frame(FrameKind::Stripe, 5, &last)),
            Ok(Assembled::Striped {
                tag: 5,
                head,
                part: b"123".to_vec()
            })
        );
        assert!(a.take(frame(FrameKind::Stripe, 5, b"short")).is_err());
    }
}
