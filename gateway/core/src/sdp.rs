//! SDP text helpers for what str0m's SDP API leaves to us: counting and reading media sections,
//! and narrowing the codecs of a section.
//!
//! An SFU that does not transcode must make a publication carry one definite codec and offer each
//! subscriber only that codec: str0m answers a publisher with every codec both sides support and
//! offers a subscriber every codec it knows, so without [`restrict_codecs`] a subscriber that
//! decodes only H.264 would accept an offer whose H.264 no publisher sends, and see nothing.

/// Each media section becomes a track every subscriber is offered: cap them before parsing.
pub fn check_sections(offer: &str, limit: usize) -> Result<(), String> {
    let sections = offer.lines().filter(|l| l.starts_with("m=")).count();
    if sections > limit {
        return Err(format!("offer has {sections} media sections; at most {limit}"));
    }
    Ok(())
}

/// Count `m=audio`/`m=video` sections that were accepted (port not 0).
/// The offer `sdp` with other ICE credentials (every `a=ice-ufrag`/`a=ice-pwd` line) and
/// without its candidates: how a client's earlier offer is replayed for an ICE restart it asked
/// for with the credentials alone (WHIP/WHEP PATCH, RFC 9725 §4.3).
pub fn with_ice_credentials(sdp: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str("a=ice-ufrag:");
            out.push_str(ufrag);
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str("a=ice-pwd:");
            out.push_str(pwd);
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// RFC 8445 §5.3: ice-char is ALPHA / DIGIT / "+" / "/"; a ufrag has 4 to 256, a password 22
/// to 256 of them.
pub fn valid_ice_credentials(ufrag: &str, pwd: &str) -> bool {
    let chars = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    (4..=256).contains(&ufrag.len()) && (22..=256).contains(&pwd.len()) && chars(ufrag) && chars(pwd)
}

pub fn accepted_media_sections(sdp: &str) -> usize {
    sdp.lines()
        .filter(|l| l.starts_with("m=audio ") || l.starts_with("m=video "))
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p != "0"))
        .count()
}

pub fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines().find_map(|l| l.trim_end().strip_prefix("a=mid:").map(str::to_owned))
}

/// The codecs of one media section, as its lines list them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SectionCodecs {
    pub mid: Option<String>,
    /// Payload types in the `m=` line's order (the first is the one a sender uses).
    pub pts: Vec<u8>,
    /// `(rtx, repaired)` for every `a=fmtp:<rtx> apt=<repaired>`.
    pub rtx: Vec<(u8, u8)>,
    /// The section is disabled or rejected (port 0).
    pub rejected: bool,
}

impl SectionCodecs {
    /// The section's first codec and the RTX payload type that repairs it, if any.
    pub fn primary_with_rtx(&self) -> Vec<u8> {
        let Some(&first) = self.pts.first() else { return Vec::new() };
        let mut keep = vec![first];
        keep.extend(self.rtx.iter().filter(|(_, apt)| *apt == first).map(|(rtx, _)| *rtx));
        keep
    }
}

fn section_codecs(lines: &[&str]) -> SectionCodecs {
    let mut c = SectionCodecs::default();
    for l in lines {
        let l = l.trim_end();
        if let Some(m) = l.strip_prefix("m=") {
            c.pts = m.split_whitespace().skip(3).filter_map(|p| p.parse().ok()).collect();
            c.rejected = m.split_whitespace().nth(1) == Some("0");
        } else if let Some(mid) = l.strip_prefix("a=mid:") {
            c.mid = Some(mid.to_owned());
        } else if let Some(f) = l.strip_prefix("a=fmtp:") {
            let mut it = f.splitn(2, ' ');
            let (Some(pt), Some(params)) = (it.next(), it.next()) else { continue };
            let apt = params.split(';').find_map(|p| p.trim().strip_prefix("apt=")).and_then(|v| v.parse().ok());
            if let (Ok(pt), Some(apt)) = (pt.parse(), apt) {
                c.rtx.push((pt, apt));
            }
        }
    }
    c
}

/// The payload type a codec attribute line (`a=rtpmap:`, `a=fmtp:`, `a=rtcp-fb:`) is about;
/// `None` for other lines and for `a=rtcp-fb:*`.
fn attribute_pt(line: &str) -> Option<u8> {
    let rest = ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"].iter().find_map(|p| line.strip_prefix(p))?;
    rest.split(' ').next()?.trim_end().parse().ok()
}

/// Split into the session part and one slice of lines per media section (lines keep their
/// line endings).
fn split(sdp: &str) -> (Vec<&str>, Vec<Vec<&str>>) {
    let mut session = Vec::new();
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            sections.push(vec![line]);
        } else if let Some(s) = sections.last_mut() {
            s.push(line);
        } else {
            session.push(line);
        }
    }
    (session, sections)
}

/// The codecs of every media section, in order.
pub fn codecs(sdp: &str) -> Vec<SectionCodecs> {
    split(sdp).1.iter().map(|s| section_codecs(s)).collect()
}

/// Narrow the codecs of media sections: `keep(section)` gives the payload types to leave (in
/// the section's own order), or `None` to leave the section as it is. The `m=` line's format
/// list and the `a=rtpmap`/`a=fmtp`/`a=rtcp-fb` lines of the other payload types go. A section
/// whose kept list would be empty, or that is already disabled (port 0), is left alone.
pub fn restrict_codecs(sdp: &str, keep: impl Fn(&SectionCodecs) -> Option<Vec<u8>>) -> String {
    let (session, sections) = split(sdp);
    let mut out = String::with_capacity(sdp.len());
    session.iter().for_each(|l| out.push_str(l));
    for lines in sections {
        let codecs = section_codecs(&lines);
        let disabled = codecs.rejected;
        let kept: Option<Vec<u8>> = keep(&codecs)
            .map(|k| codecs.pts.iter().copied().filter(|pt| k.contains(pt)).collect::<Vec<u8>>())
            .filter(|k| !k.is_empty() && !disabled && k.len() < codecs.pts.len());
        let Some(kept) = kept else {
            lines.iter().for_each(|l| out.push_str(l));
            continue;
        };
        let m = lines[0];
        let ending = &m[m.trim_end().len()..];
        let head: Vec<&str> = m.trim_end().split(' ').take(3).collect();
        out.push_str(&head.join(" "));
        for pt in &kept {
            out.push(' ');
            out.push_str(&pt.to_string());
        }
        out.push_str(ending);
        for l in &lines[1..] {
            if attribute_pt(l).is_some_and(|pt| !kept.contains(&pt)) {
                continue;
            }
            out.push_str(l);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 9\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\n\
a=fmtp:111 minptime=10;useinbandfec=1\r\na=rtcp-fb:111 transport-cc\r\na=rtpmap:9 G722/8000\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtcp-fb:* nack\r\n\
a=rtpmap:96 VP8/90000\r\na=rtcp-fb:96 nack pli\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n\
a=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
a=rtpmap:103 rtx/90000\r\na=fmtp:103 apt=102\r\na=ssrc:1 cname:x\r\n";

    #[test]
    fn sections_are_read_with_their_rtx() {
        let c = codecs(OFFER);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].mid.as_deref(), Some("0"));
        assert_eq!(c[0].pts, vec![111, 9]);
        assert_eq!(c[0].primary_with_rtx(), vec![111]);
        assert_eq!(c[1].pts, vec![96, 97, 102, 103]);
        assert_eq!(c[1].rtx, vec![(97, 96), (103, 102)]);
        assert_eq!(c[1].primary_with_rtx(), vec![96, 97]);
    }

    #[test]
    fn restricting_keeps_one_codec_and_its_lines() {
        let out = restrict_codecs(OFFER, |s| (s.mid.as_deref() == Some("1")).then(|| vec![102, 103]));
        assert!(out.contains("m=video 9 UDP/TLS/RTP/SAVPF 102 103\r\n"), "{out}");
        assert!(!out.contains("VP8") && !out.contains("a=fmtp:97") && !out.contains("a=rtcp-fb:96"), "{out}");
        assert!(out.contains("a=rtcp-fb:* nack\r\n") && out.contains("a=fmtp:103 apt=102\r\n"));
        assert!(out.contains("a=ssrc:1 cname:x\r\n"), "other lines stay");
        // The audio section is untouched, and the result parses as str0m SDP.
        assert!(out.contains("m=audio 9 UDP/TLS/RTP/SAVPF 111 9\r\n"));
        assert_eq!(codecs(&out)[1].pts, vec![102, 103]);
        // Everything kept, nothing kept, or a disabled section: unchanged.
        assert_eq!(restrict_codecs(OFFER, |s| Some(s.pts.clone())), OFFER);
        assert_eq!(restrict_codecs(OFFER, |_| Some(vec![55])), OFFER);
        let disabled = OFFER.replace("m=video 9 ", "m=video 0 ");
        assert_eq!(restrict_codecs(&disabled, |_| Some(vec![96])), disabled);
    }

    #[test]
    fn sections_are_counted_and_capped() {
        assert_eq!(accepted_media_sections(OFFER), 2);
        assert!(check_sections(OFFER, 2).is_ok());
        assert!(check_sections(OFFER, 1).is_err());
        assert_eq!(first_mid(OFFER).as_deref(), Some("0"));
    }
    #[test]
    fn an_offer_is_replayed_with_new_ice_credentials_and_no_candidates() {
        let offer = "v=0\r\na=group:BUNDLE 0 1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:old1\r\n\
                     a=ice-pwd:oldpasswordoldpassword12\r\na=mid:0\r\na=candidate:1 1 udp 1 10.0.0.2 5000 typ host\r\n\
                     a=end-of-candidates\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=ice-ufrag:old1\r\n\
                     a=ice-pwd:oldpasswordoldpassword12\r\na=mid:1\r\n";
        let out = with_ice_credentials(offer, "new2", "newpasswordnewpassword34");
        assert_eq!(out.matches("a=ice-ufrag:new2\r\n").count(), 2, "{out}");
        assert_eq!(out.matches("a=ice-pwd:newpasswordnewpassword34\r\n").count(), 2, "{out}");
        assert!(!out.contains("old") && !out.contains("candidate"), "{out}");
        assert!(out.starts_with("v=0\r\na=group:BUNDLE 0 1\r\nm=audio") && out.contains("a=mid:1\r\n"), "{out}");
    }

    #[test]
    fn ice_credentials_are_ice_characters_of_the_right_length() {
        assert!(valid_ice_credentials("abcd", "0123456789abcdef012345"));
        assert!(valid_ice_credentials("a+/b", "0123456789abcdef0123+/"));
        assert!(!valid_ice_credentials("abc", "0123456789abcdef012345"), "ufrag too short");
        assert!(!valid_ice_credentials("abcd", "0123456789abcdef01234"), "password too short");
        assert!(!valid_ice_credentials("ab d", "0123456789abcdef012345"), "a space");
        assert!(!valid_ice_credentials("abcd", "0123456789abcdef01234\r\na=x"), "a line break");
    }
}
