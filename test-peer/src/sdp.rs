//! What the gateway's subscribe offers say about each media section: which participant's
//! stream it carries (`a=msid:<participant> <stream id>`).

/// `a=mid` → (`a=msid` participant, stream id) for every media section of an SDP that has both.
pub fn msid_by_mid(sdp: &str) -> Vec<(String, (String, String))> {
    let mut out = Vec::new();
    let mut mid: Option<String> = None;
    let mut msid: Option<(String, String)> = None;
    let mut flush = |mid: &mut Option<String>, msid: &mut Option<(String, String)>| {
        if let (Some(m), Some(s)) = (mid.take(), msid.take()) {
            out.push((m, s));
        }
    };
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            flush(&mut mid, &mut msid);
        } else if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.to_owned());
        } else if let Some(m) = line.strip_prefix("a=msid:") {
            let mut parts = m.split_whitespace();
            if let (Some(p), Some(s)) = (parts.next(), parts.next()) {
                msid = Some((p.to_owned(), s.to_owned()));
            }
        }
    }
    flush(&mut mid, &mut msid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msid_lines_map_mids_to_streams() {
        let sdp = "v=0\r\nm=application 9 x\r\na=mid:0\r\nm=video 9 x\r\na=mid:1\r\na=msid:alice st_1\r\n\
                   m=audio 9 x\r\na=msid:bob st_2\r\na=mid:2\r\n";
        let got = msid_by_mid(sdp);
        assert_eq!(
            got,
            vec![
                ("1".to_owned(), ("alice".to_owned(), "st_1".to_owned())),
                ("2".to_owned(), ("bob".to_owned(), "st_2".to_owned()))
            ]
        );
    }
}
