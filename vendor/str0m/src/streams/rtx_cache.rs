use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use crate::io::DATAGRAM_MAX_PACKET_SIZE;
use crate::packet::Vp8Patch;
use crate::rtp_::{Pt, RtpHeader, SeqNo, Ssrc};

use super::RtpPacket;
use super::rtx_cache_buf::EvictingBuffer;

const RTX_CACHE_SIZE_QUANTIZER: usize = 25;
const RTX_CACHE_QUANTIZE_SLOTS: usize = DATAGRAM_MAX_PACKET_SIZE / RTX_CACHE_SIZE_QUANTIZER;

#[derive(Debug)]
pub(crate) struct RtxCache {
    // Data, new additions here probably need to be cleared in [`clear`].
    packet_by_seq_no: EvictingBuffer<CachedPacket>,

    // Technically we want [Option<SeqNo>; X] to indicate the absence of
    // a SeqNo. However We can half the storage space by using the sentinel
    // values SeqNo::MAX to indicate None
    seq_no_by_quantized_size: [SeqNo; RTX_CACHE_QUANTIZE_SLOTS],
}

/// A sent packet as the cache keeps it: what a resend (or a spurious resend as padding) needs
/// to write it again.
///
/// A whole [`RtpPacket`] is ~400 bytes, most of them the header's CSRC array and extension
/// values, which nearly every packet leaves at their defaults, and a cache holds a second or
/// more of a stream's packets. This keeps ~50 bytes: the payload (shared, not copied), the VP8
/// patch and the header's own fields, the whole header boxed only when it has anything else.
/// The packet's `time` and `timestamp` are not kept: a resend writes neither.
#[derive(Debug)]
pub(crate) struct CachedPacket {
    payload: Arc<[u8]>,
    vp8_patch: Option<Vp8Patch>,
    header: CachedHeader,
}

#[derive(Debug)]
enum CachedHeader {
    /// [`RtpHeader::default()`] but for these fields.
    Plain {
        payload_type: Pt,
        marker: bool,
        sequence_number: u16,
        timestamp: u32,
        ssrc: Ssrc,
    },
    /// CSRCs, extension values or any other field set: the header as it was.
    Full(Box<RtpHeader>),
}

impl CachedHeader {
    /// `header` as a [`CachedHeader::Plain`], if that is all it has.
    fn plain(header: &RtpHeader) -> Option<Self> {
        let plain = RtpHeader {
            payload_type: header.payload_type,
            marker: header.marker,
            sequence_number: header.sequence_number,
            timestamp: header.timestamp,
            ssrc: header.ssrc,
            ..Default::default()
        };
        (*header == plain).then_some(CachedHeader::Plain {
            payload_type: plain.payload_type,
            marker: plain.marker,
            sequence_number: plain.sequence_number,
            timestamp: plain.timestamp,
            ssrc: plain.ssrc,
        })
    }
}

impl CachedPacket {
    fn new(packet: RtpPacket) -> Self {
        let RtpPacket {
            header,
            payload,
            vp8_patch,
            ..
        } = packet;
        CachedPacket {
            header: CachedHeader::plain(&header)
                .unwrap_or_else(|| CachedHeader::Full(Box::new(header))),
            payload,
            vp8_patch,
        }
    }

    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// Write the cached packet with sequence number `seq_no` into `pkt`: seq_no, header,
    /// payload and VP8 patch as they were sent, nackable. `time`, `timestamp` and
    /// `last_sender_info` are left as they are.
    pub fn restore_into(&self, seq_no: SeqNo, pkt: &mut RtpPacket) {
        pkt.seq_no = seq_no;
        pkt.header = match &self.header {
            CachedHeader::Plain {
                payload_type,
                marker,
                sequence_number,
                timestamp,
                ssrc,
            } => RtpHeader {
                payload_type: *payload_type,
                marker: *marker,
                sequence_number: *sequence_number,
                timestamp: *timestamp,
                ssrc: *ssrc,
                ..Default::default()
            },
            CachedHeader::Full(header) => (**header).clone(),
        };
        pkt.payload = Arc::clone(&self.payload);
        pkt.vp8_patch = self.vp8_patch;
        pkt.nackable = true;
    }
}

impl RtxCache {
    pub fn new(max_packet_count: usize, max_packet_age: Duration) -> Self {
        Self {
            packet_by_seq_no: EvictingBuffer::new(10, max_packet_age, max_packet_count),
            seq_no_by_quantized_size: [SeqNo::MAX; RTX_CACHE_QUANTIZE_SLOTS],
        }
    }

    pub fn cache_sent_packet(&mut self, packet: RtpPacket, now: Instant) {
        assert!(packet.nackable);
        let seq_no = packet.seq_no;
        self.insert(seq_no, CachedPacket::new(packet), now);
    }

    /// As [`Self::cache_sent_packet()`] for a packet sent without an `RtpPacket`: its header
    /// (as sent, but for the per-send abs-send-time and transport-wide sequence number, which
    /// a resend writes anew), payload and VP8 patch.
    pub fn cache_sent(
        &mut self,
        seq_no: SeqNo,
        header: &RtpHeader,
        payload: Arc<[u8]>,
        vp8_patch: Option<Vp8Patch>,
        now: Instant,
    ) {
        let header = CachedHeader::plain(header)
            .unwrap_or_else(|| CachedHeader::Full(Box::new(header.clone())));
        let packet = CachedPacket {
            payload,
            vp8_patch,
            header,
        };
        self.insert(seq_no, packet, now);
    }

    fn insert(&mut self, seq_no: SeqNo, packet: CachedPacket, now: Instant) {
        let quantized_size = packet.payload.len() / RTX_CACHE_SIZE_QUANTIZER;
        self.packet_by_seq_no.push(*seq_no, now, packet);
        self.seq_no_by_quantized_size[quantized_size] = seq_no;
        self.remove_old_packets(now);
    }

    pub fn last_cached_seq_no(&self) -> Option<SeqNo> {
        Some(self.packet_by_seq_no.last_position()?.into())
    }

    pub fn get_cached_packet_by_seq_no(&self, seq_no: SeqNo) -> Option<&CachedPacket> {
        self.packet_by_seq_no.get(*seq_no)
    }

    /// The most recent cached packet of a payload smaller than `max_size` (by the size
    /// quantization), with its sequence number.
    pub fn get_cached_packet_smaller_than(
        &self,
        max_size: usize,
    ) -> Option<(SeqNo, &CachedPacket)> {
        let quantized_size = max_size / RTX_CACHE_SIZE_QUANTIZER;

        let seq_no = self.seq_no_by_quantized_size[..quantized_size]
            .iter()
            .rev()
            .filter(|seq_no| !seq_no.is_max())
            .find(|seq_no| self.packet_by_seq_no.contains(***seq_no))?;

        Some((*seq_no, self.get_cached_packet_by_seq_no(*seq_no)?))
    }

    fn remove_old_packets(&mut self, now: Instant) {
        self.packet_by_seq_no.maybe_evict(now);
    }

    pub(crate) fn last_packet(&self) -> Option<&[u8]> {
        let packet = self.packet_by_seq_no.last()?;
        Some(packet.payload.as_ref())
    }

    pub(crate) fn clear(&mut self) {
        self.packet_by_seq_no.clear();
        self.seq_no_by_quantized_size = [SeqNo::MAX; RTX_CACHE_QUANTIZE_SLOTS];
    }
}

#[cfg(test)]
mod test {
    use crate::rtp_::MediaTime;
    use crate::rtp_::RtpHeader;

    use super::*;

    fn after(now: Instant, millis: u64) -> Instant {
        now + Duration::from_millis(millis)
    }

    /// What a resend of a cached packet writes: sequence number, header, payload.
    type Resent = (SeqNo, RtpHeader, Arc<[u8]>);

    fn resent(pkt: &RtpPacket) -> Resent {
        (pkt.seq_no, pkt.header.clone(), pkt.payload.clone())
    }

    fn restored(cached: Option<&CachedPacket>, seq_no: u64) -> Option<Resent> {
        let mut pkt = RtpPacket::blank();
        cached?.restore_into(seq_no.into(), &mut pkt);
        assert!(pkt.nackable);
        Some(resent(&pkt))
    }

    fn restored_smaller(cached: Option<(SeqNo, &CachedPacket)>) -> Option<Resent> {
        let (seq_no, cached) = cached?;
        restored(Some(cached), *seq_no)
    }

    fn packet(now: Instant, seq_no: u64, millis: u64) -> RtpPacket {
        RtpPacket {
            header: RtpHeader::default(),
            seq_no: seq_no.into(),
            time: MediaTime::from_90khz(0),
            payload: millis.to_be_bytes().into(),
            vp8_patch: None,
            timestamp: after(now, millis),
            last_sender_info: None,
            nackable: true,
        }
    }

    #[test]
    fn rtx_cache_0_sized() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(0, Duration::from_secs(3));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert_eq!(
            Some(resent(&packet(now, 1, 10))),
            restored(rtx_cache.get_cached_packet_by_seq_no(1.into()), 1)
        );
        assert_eq!(
            Some(resent(&packet(now, 1, 10))),
            restored_smaller(rtx_cache.get_cached_packet_smaller_than(1000))
        );
    }

    #[test]
    fn rtx_cache_0_duration() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(10, Duration::from_secs(0));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert!(rtx_cache.get_cached_packet_by_seq_no(1.into()).is_none());
        assert!(rtx_cache.get_cached_packet_smaller_than(1000).is_none());
    }

    #[test]
    fn rtx_cache_1_sized() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(1, Duration::from_secs(3));
        rtx_cache.cache_sent_packet(packet(now, 1, 10), after(now, 10));
        assert_eq!(
            Some(resent(&packet(now, 1, 10))),
            restored(rtx_cache.get_cached_packet_by_seq_no(1.into()), 1)
        );
        assert_eq!(
            Some(resent(&packet(now, 1, 10))),
            restored_smaller(rtx_cache.get_cached_packet_smaller_than(1000))
        );
        assert_eq!(
            Some(resent(&packet(now, 1, 10))),
            restored_smaller(rtx_cache.get_cached_packet_smaller_than(25))
        );
        assert!(rtx_cache.get_cached_packet_smaller_than(24).is_none());
        rtx_cache.cache_sent_packet(packet(now, 2, 20), after(now, 20));
        assert_eq!(
            Some(resent(&packet(now, 2, 20))),
            restored(rtx_cache.get_cached_packet_by_seq_no(2.into()), 2)
        );
    }

    #[test]
    fn rtx_cache_100_sized_backwards() {
        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(100, Duration::from_secs(3));

        for i in 1..=200 {
            let seq_no = 201 - i;
            let pkt = packet(now, seq_no, (201 - i) * 10);
            let now = after(now, i * 10);
            rtx_cache.cache_sent_packet(pkt, now);
        }

        assert_eq!(
            Some(resent(&packet(now, 200, 2000))),
            restored(rtx_cache.get_cached_packet_by_seq_no(200.into()), 200)
        );
        assert!(rtx_cache.get_cached_packet_by_seq_no(100.into()).is_none());
        assert!(rtx_cache.get_cached_packet_by_seq_no(101.into()).is_none());
    }

    #[test]
    fn rtx_cache_eviction() {
        let now = Instant::now();
        // Cache can take all entries
        let mut rtx_cache = RtxCache::new(400, Duration::from_secs(1));
        for i in 1..=200 {
            let seq_no = i;
            let pkt = packet(now, seq_no, i * 10);
            let now = after(now, i * 10);
            rtx_cache.cache_sent_packet(pkt, now);
        }

        assert!(rtx_cache.get_cached_packet_by_seq_no(99.into()).is_none());

        assert_eq!(
            Some(resent(&packet(now, 100, 1000))),
            restored(rtx_cache.get_cached_packet_by_seq_no(100.into()), 100)
        );
        assert_eq!(
            Some(resent(&packet(now, 200, 2000))),
            restored(rtx_cache.get_cached_packet_by_seq_no(200.into()), 200)
        );
    }

    #[test]
    fn rtx_cache_keeps_what_a_resend_writes() {
        use crate::rtp_::{ExtensionValues, Mid, VideoOrientation};

        let now = Instant::now();
        let mut rtx_cache = RtxCache::new(10, Duration::from_secs(3));

        // A header with only the plain fields set is kept without the rest.
        let mut plain = packet(now, 1, 10);
        plain.header.payload_type = 96.into();
        plain.header.marker = true;
        plain.header.sequence_number = 1;
        plain.header.timestamp = 90_000;
        plain.header.ssrc = 1234.into();
        let plain_sent = resent(&plain);

        // Extension values (and CSRCs) are kept as they were.
        let mut ext = packet(now, 2, 20);
        ext.header.ext_vals = ExtensionValues {
            video_orientation: Some(VideoOrientation::Deg90),
            mid: Some(Mid::from("v0")),
            ..Default::default()
        };
        ext.header.csrc_count = 1;
        ext.header.csrc[0] = 42;
        let ext_sent = resent(&ext);

        rtx_cache.cache_sent_packet(plain, after(now, 10));
        rtx_cache.cache_sent_packet(ext, after(now, 20));

        let cached = rtx_cache.get_cached_packet_by_seq_no(1.into()).unwrap();
        assert!(matches!(cached.header, CachedHeader::Plain { .. }));
        assert_eq!(Some(plain_sent), restored(Some(cached), 1));

        let cached = rtx_cache.get_cached_packet_by_seq_no(2.into()).unwrap();
        assert!(matches!(cached.header, CachedHeader::Full(_)));
        assert_eq!(Some(ext_sent), restored(Some(cached), 2));

        // The point of it: an entry is a fraction of a packet.
        assert!(std::mem::size_of::<CachedPacket>() <= 64);
        assert!(std::mem::size_of::<RtpPacket>() > 300);
    }

    #[test]
    fn a_plain_entry_is_only_a_header_with_nothing_but_the_kept_fields() {
        let kept = RtpHeader {
            payload_type: 96.into(),
            marker: true,
            sequence_number: 7,
            timestamp: 3000,
            ssrc: 42.into(),
            ..Default::default()
        };
        assert!(matches!(
            CachedHeader::plain(&kept),
            Some(CachedHeader::Plain {
                sequence_number: 7,
                timestamp: 3000,
                marker: true,
                ..
            })
        ));
        let changes: [fn(&mut RtpHeader); 7] = [
            |h| h.version = 1,
            |h| h.has_padding = true,
            |h| h.has_extension = false,
            |h| h.csrc_count = 1,
            |h| h.csrc[3] = 1,
            |h| h.header_len = 20,
            |h| h.ext_vals.audio_level = Some(-30),
        ];
        for change in changes {
            let mut header = kept.clone();
            change(&mut header);
            assert!(CachedHeader::plain(&header).is_none(), "{header:?}");
        }
    }
}
