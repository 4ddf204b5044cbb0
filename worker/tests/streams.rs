//! Nothing in the source is lost: every audio track and text subtitle track reaches MP4, HLS and CMAF
//! outputs with its language, bitmap subtitles are reported as left out, and the outputs play to the end in
//! real players (hls.js, dash.js, Shaka Player in headless Chromium) that list every track.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use tessera_e2e::players::play;

/// A PGS (Blu-ray bitmap) subtitle file with two captions: FFmpeg cannot make one from text, so it is
/// written here, segment by segment (presentation composition, window, palette, object, end).
fn pgs_sup() -> Vec<u8> {
    fn seg(out: &mut Vec<u8>, pts: u32, kind: u8, payload: &[u8]) {
        out.extend_from_slice(b"PG");
        out.extend_from_slice(&pts.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
    }
    let (w, h, ow, oh, x, y) = (320u16, 240u16, 64u16, 16u16, 128u16, 200u16);
    let be = |v: u16| v.to_be_bytes();
    let window = [&[1u8, 0][..], &be(x), &be(y), &be(ow), &be(oh)].concat();
    let mut out = Vec::new();
    for (n, (start, end)) in [(1.0f64, 3.0f64), (4.0, 6.0)].into_iter().enumerate() {
        let pts = (start * 90_000.0) as u32;
        let pcs = [
            &be(w)[..],
            &be(h),
            &[0x10],
            &be(2 * n as u16),
            &[0x80, 0, 0, 1],
            &be(0),
            &[0, 0],
            &be(x),
            &be(y),
        ]
        .concat();
        seg(&mut out, pts, 0x16, &pcs);
        seg(&mut out, pts, 0x17, &window);
        seg(&mut out, pts, 0x14, &[0, 0, 1, 235, 128, 128, 255]);
        // Run-length lines of colour 1, 64 pixels each: 00, 11LLLLLL LLLLLLLL, colour; then 00 00.
        let mut rle = Vec::new();
        for _ in 0..oh {
            rle.extend_from_slice(&[0, 0xC0 | (ow >> 8) as u8, ow as u8, 1, 0, 0]);
        }
        let len = (rle.len() + 4) as u32;
        let ods = [
            &be(0)[..],
            &[0, 0xC0],
            &len.to_be_bytes()[1..],
            &be(ow),
            &be(oh),
            &rle,
        ]
        .concat();
        seg(&mut out, pts, 0x15, &ods);
        seg(&mut out, pts, 0x80, &[]);
        // Cleared at the end time: a composition with no objects.
        let end_pts = (end * 90_000.0) as u32;
        let clear = [
            &be(w)[..],
            &be(h),
            &[0x10],
            &be(2 * n as u16 + 1),
            &[0, 0, 0, 0],
        ]
        .concat();
        seg(&mut out, end_pts, 0x16, &clear);
        seg(&mut out, end_pts, 0x17, &window);
        seg(&mut out, end_pts, 0x80, &[]);
    }
    out
}

const EN_SRT: &str = "1\n00:00:00,500 --> 00:00:02,000\nHello <i>world</i>\n\n2\n00:00:03,000 --> 00:00:05,500\nA cue across\na chunk boundary\n\n3\n00:00:06,200 --> 00:00:07,400\nLast words\n";
const ES_SRT: &str =
    "1\n00:00:01,000 --> 00:00:04,000\nHola mundo\n\n2\n00:00:06,000 --> 00:00:07,000\nAdiós\n";

/// 8 s of 320x240 H.264 at 25 fps (a keyframe a second) with three audio tracks (English stereo AAC,
/// French 5.1 AC-3, German mono Opus), two text subtitle tracks (English SRT, Spanish ASS, forced) and one
/// bitmap track (English PGS).
fn source() -> PathBuf {
    let dir = target_dir();
    let files = [
        ("streams-en.srt", EN_SRT.as_bytes().to_vec()),
        ("streams-es.srt", ES_SRT.as_bytes().to_vec()),
        ("streams-pgs.sup", pgs_sup()),
    ];
    for (name, body) in &files {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    fixture(
        "streams-src.mkv",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=8",
            "-f",
            "lavfi",
            "-i",
            "sine=f=440:d=8:sample_rate=48000,aformat=channel_layouts=stereo",
            "-f",
            "lavfi",
            "-i",
            "sine=f=220:d=8:sample_rate=48000,aformat=channel_layouts=5.1",
            "-f",
            "lavfi",
            "-i",
            "sine=f=660:d=8:sample_rate=48000",
            "-i",
            &p("streams-en.srt"),
            "-i",
            &p("streams-es.srt"),
            "-i",
            &p("streams-pgs.sup"),
            "-map",
            "0",
            "-map",
            "1",
            "-map",
            "2",
            "-map",
            "3",
            "-map",
            "4",
            "-map",
            "5",
            "-map",
            "6",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-pix_fmt",
            "yuv420p",
            "-c:a:0",
            "aac",
            "-c:a:1",
            "ac3",
            "-c:a:2",
            "libopus",
            "-c:s:0",
            "srt",
            "-c:s:1",
            "ass",
            "-c:s:2",
            "copy",
            "-metadata:s:a:0",
            "language=eng",
            "-metadata:s:a:0",
            "title=English Stereo",
            "-metadata:s:a:1",
            "language=fre",
            "-metadata:s:a:2",
            "language=ger",
            "-metadata:s:s:0",
            "language=eng",
            "-metadata:s:s:1",
            "language=spa",
            "-metadata:s:s:2",
            "language=eng",
            "-disposition:a:0",
            "default",
            "-disposition:s:1",
            "forced",
        ],
    )
}

/// The source's frame count and its text cues' start times (English track).
const FRAMES: u64 = 200;
const EN_STARTS: [f64; 3] = [0.5, 3.0, 6.2];

fn run(name: &str, container: &str, renditions: &str, extra: &str) -> (PathBuf, Value) {
    let out = out_dir(name);
    let yaml = job_yaml(
        &source(),
        &out,
        container,
        renditions,
        &format!("  chunking: {{targetSeconds: 2}}\n  hardware: software\n{extra}"),
    );
    let s = tessera_ok(&out, &yaml, &["--workers", "2"]);
    assert_eq!(s["chunks"].as_u64(), Some(4), "{s}");
    (out, s)
}

/// Every source stream is in the rendition's status or left out with a reason; the PGS track is left out
/// as bitmap.
fn check_status(r: &Value, subtitle_codec: &str) {
    let streams = r["streams"].as_array().expect("streams");
    let kinds: Vec<(&str, &str, Option<&str>)> = streams
        .iter()
        .map(|s| {
            (
                s["kind"].as_str().unwrap(),
                s["codec"].as_str().unwrap(),
                s["language"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("video", "h264", None),
            ("audio", "aac", Some("eng")),
            ("audio", "aac", Some("fre")),
            ("audio", "aac", Some("ger")),
            ("subtitle", subtitle_codec, Some("eng")),
            ("subtitle", subtitle_codec, Some("spa")),
        ],
        "{r}"
    );
    assert_eq!(streams[2]["channels"], 6, "5.1 stays 5.1: {r}");
    assert_eq!(streams[1]["title"], "English Stereo");
    assert_eq!(streams[1]["default"], true);
    assert_eq!(streams[5]["forced"], true);
    let left = r["leftOut"].as_array().expect("leftOut");
    assert_eq!(left.len(), 1, "{r}");
    assert_eq!(left[0]["sourceIndex"], 6);
    assert_eq!(left[0]["codec"], "hdmv_pgs_subtitle");
    assert!(
        left[0]["reason"].as_str().unwrap().contains("bitmap"),
        "{r}"
    );
}

#[test]
fn mp4_keeps_every_track_with_its_language_and_reports_the_bitmap_one() {
    let (out, s) = run(
        "streams-mp4",
        "mp4",
        "    - {name: v, video: {codec: h264, crf: 30, preset: ultrafast}}\n",
        "",
    );
    check_status(&s["renditions"][0], "mov_text");
    let mp4 = out.join("v.mp4");
    let probe = ffprobe(
        &mp4,
        &[
            "-show_entries",
            "stream=codec_type,codec_name,channels:stream_tags=language:stream_disposition=forced",
        ],
    );
    let got: Vec<String> = probe["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {}",
                s["codec_type"].as_str().unwrap(),
                s["codec_name"].as_str().unwrap(),
                s["tags"]["language"].as_str().unwrap_or("-"),
                s["channels"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "video h264 und 0",
            "audio aac eng 2",
            "audio aac fra 6",
            "audio aac deu 1",
            "subtitle mov_text eng 0",
            "subtitle mov_text spa 0",
        ]
    );
    // Cue timing: within one frame of the source, measured against the first video frame.
    let first_video = frame_times(&mp4)[0];
    let cues = ffprobe(
        &mp4,
        &[
            "-select_streams",
            "s:0",
            "-show_entries",
            "packet=pts_time,size",
        ],
    );
    // mov_text fills the gaps between cues with empty samples (2 bytes: a zero text length).
    let starts: Vec<f64> = cues["packets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["size"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                > 2
        })
        .map(|p| p["pts_time"].as_str().unwrap().parse::<f64>().unwrap() - first_video)
        .collect();
    assert_eq!(starts.len(), EN_STARTS.len(), "{cues}");
    for (a, b) in starts.iter().zip(EN_STARTS) {
        assert!((a - b).abs() <= 0.040, "cue at {a}s, source {b}s");
    }
    // A second reader, mediainfo, sees the same languages.
    let mi = std::process::Command::new("mediainfo")
        .arg("--Output=Audio;%Language%,")
        .arg(&mp4)
        .output()
        .expect("mediainfo (make setup installs it)");
    assert_eq!(String::from_utf8_lossy(&mi.stdout).trim(), "en,fr,de,");
}

/// hls.js (or another player) played `manifest` to its end, every frame decoded, listing the tracks.
fn check_played(r: &Value, frames: u64, audio: &[&str], text: &[&str]) {
    assert_eq!(r["ended"], true, "{r}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(r["frames"].as_u64(), Some(frames), "{r}");
    let langs = |k: &str| -> Vec<String> {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|t| t["lang"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(langs("audio"), audio, "{r}");
    assert_eq!(langs("text"), text, "{r}");
}

/// The player's English cues start within one frame of the source's.
fn check_cues(r: &Value) {
    let shown = r["cues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["mode"] == "showing" && t["lang"] == "en")
        .unwrap_or_else(|| panic!("no English cues shown: {r}"));
    let starts: Vec<f64> = shown["cues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["start"].as_f64().unwrap())
        .collect();
    // A cue crossing a segment boundary is in both segments; players keep one.
    assert_eq!(starts.len(), EN_STARTS.len(), "{r}");
    for (a, b) in starts.iter().zip(EN_STARTS) {
        assert!((a - b).abs() <= 0.040, "cue at {a}s, source {b}s: {r}");
    }
}

#[test]
fn hls_with_several_tracks_has_audio_and_subtitle_renditions_that_hls_js_plays() {
    let (out, s) = run(
        "streams-hls",
        "hls",
        "    - {name: v, video: {codec: h264, crf: 30, preset: ultrafast}}\n",
        "",
    );
    check_status(&s["renditions"][0], "webvtt");
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    for needle in [
        "TYPE=AUDIO,GROUP-ID=\"audio0\",NAME=\"English Stereo\",LANGUAGE=\"en\",DEFAULT=YES",
        "NAME=\"French\",LANGUAGE=\"fr\",DEFAULT=NO,AUTOSELECT=YES,CHANNELS=\"6\"",
        "TYPE=SUBTITLES,GROUP-ID=\"subs\",NAME=\"Spanish\",LANGUAGE=\"es\",DEFAULT=NO,AUTOSELECT=YES,FORCED=YES",
        "AUDIO=\"audio0\",SUBTITLES=\"subs\"",
    ] {
        assert!(master.contains(needle), "{needle} not in\n{master}");
    }
    let r = play("hls", &out, "master.m3u8", &[]);
    check_played(&r, FRAMES, &["en", "fr", "de"], &["en", "es"]);
    check_cues(&r);
}

/// The child elements of `n` named `name`.
fn el<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Vec<roxmltree::Node<'a, 'i>> {
    n.children()
        .filter(|c| c.is_element() && c.tag_name().name() == name)
        .collect()
}

/// What ISO/IEC 23009-1 asks of a static MPD that these checks can see, and that every segment it names
/// exists and lasts what the timeline says (read by ffprobe from the segment itself). Returns the problems.
fn check_mpd(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("manifest.mpd")).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the MPD is well-formed XML");
    let mut bad = Vec::new();
    let root = doc.root_element();
    let ns = "urn:mpeg:dash:schema:mpd:2011";
    if root.tag_name().name() != "MPD" || root.tag_name().namespace() != Some(ns) {
        bad.push("root is not MPD in the DASH namespace".into());
    }
    let iso = |v: Option<&str>| {
        v.and_then(|v| v.strip_prefix("PT"))
            .and_then(|v| v.strip_suffix('S'))
            .and_then(|v| v.parse::<f64>().ok())
    };
    if root.attribute("type") != Some("static") {
        bad.push("MPD@type is not static".into());
    }
    if root.attribute("profiles").is_none_or(str::is_empty) {
        bad.push("MPD@profiles missing".into());
    }
    if iso(root.attribute("minBufferTime")).is_none() {
        bad.push("MPD@minBufferTime missing or not a duration".into());
    }
    let Some(total) = iso(root.attribute("mediaPresentationDuration")) else {
        bad.push("a static MPD needs @mediaPresentationDuration".into());
        return bad;
    };
    let periods = el(root, "Period");
    if periods.is_empty() {
        bad.push("no Period".into());
    }
    for p in periods {
        let sets = el(p, "AdaptationSet");
        if sets.is_empty() {
            bad.push("Period without AdaptationSet".into());
        }
        let mut set_ids = std::collections::HashSet::new();
        let mut rep_ids = std::collections::HashSet::new();
        for a in sets {
            if !set_ids.insert(a.attribute("id").unwrap_or("").to_string()) {
                bad.push("AdaptationSet@id not unique".into());
            }
            let reps = el(a, "Representation");
            if reps.is_empty() {
                bad.push("AdaptationSet without Representation".into());
            }
            let text = a.attribute("contentType") == Some("text");
            for r in reps {
                let id = r.attribute("id").unwrap_or("");
                if id.is_empty()
                    || id.contains(char::is_whitespace)
                    || !rep_ids.insert(id.to_string())
                {
                    bad.push(format!(
                        "Representation@id {id:?} empty, spaced or not unique"
                    ));
                }
                if r.attribute("bandwidth")
                    .and_then(|b| b.parse::<u64>().ok())
                    .is_none_or(|b| b == 0)
                {
                    bad.push(format!("{id}: @bandwidth missing"));
                }
                if a.attribute("mimeType")
                    .or(r.attribute("mimeType"))
                    .is_none()
                {
                    bad.push(format!("{id}: no @mimeType"));
                }
                if !text && r.attribute("codecs").is_none() {
                    bad.push(format!("{id}: no @codecs"));
                }
                let base = el(r, "BaseURL");
                let tpl = el(r, "SegmentTemplate");
                if base.len() + tpl.len() != 1 {
                    bad.push(format!(
                        "{id}: needs exactly one of BaseURL, SegmentTemplate"
                    ));
                }
                for b in base {
                    if !dir.join(b.text().unwrap_or("")).is_file() {
                        bad.push(format!("{id}: BaseURL {:?} missing", b.text()));
                    }
                }
                for t in tpl {
                    let ts: f64 = t
                        .attribute("timescale")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    let media = t.attribute("media").unwrap_or("");
                    if a.attribute("contentType") == Some("image") {
                        // Thumbnail tiles: one image per @duration, numbered from @startNumber.
                        let d: f64 = t
                            .attribute("duration")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0.0);
                        if ts <= 0.0 || d <= 0.0 || !media.contains("$Number") {
                            bad.push(format!(
                                "{id}: image SegmentTemplate needs @timescale, @duration, @media"
                            ));
                            continue;
                        }
                        let first: u64 = t
                            .attribute("startNumber")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(1);
                        for n in first..first + (total / (d / ts)).ceil() as u64 {
                            let file = media.replace("$Number%03d$", &format!("{n:03}"));
                            if !dir.join(&file).is_file() {
                                bad.push(format!("{id}: {file} missing"));
                            }
                        }
                        continue;
                    }
                    let init = t.attribute("initialization").unwrap_or("");
                    if ts <= 0.0 || !media.contains("$Number") || !dir.join(init).is_file() {
                        bad.push(format!(
                            "{id}: SegmentTemplate @timescale/@media/@initialization"
                        ));
                        continue;
                    }
                    let Some(tl) = el(t, "SegmentTimeline").into_iter().next() else {
                        bad.push(format!("{id}: no SegmentTimeline"));
                        continue;
                    };
                    let mut number: u64 = t
                        .attribute("startNumber")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1);
                    let mut time: Option<u64> = None;
                    let mut sum = 0.0;
                    for (i, s) in el(tl, "S").into_iter().enumerate() {
                        let d: u64 = s.attribute("d").and_then(|v| v.parse().ok()).unwrap_or(0);
                        let r: u64 = s.attribute("r").and_then(|v| v.parse().ok()).unwrap_or(0);
                        if i == 0 && s.attribute("t").is_none() {
                            bad.push(format!("{id}: first S without @t"));
                        }
                        if d == 0 {
                            bad.push(format!("{id}: S@d missing"));
                        }
                        if let Some(t0) = s.attribute("t").and_then(|v| v.parse().ok()) {
                            time = Some(t0);
                        }
                        for _ in 0..=r {
                            let file = media.replace("$Number%05d$", &format!("{number:05}"));
                            let seg = dir.join(&file);
                            if !seg.is_file() {
                                bad.push(format!("{id}: {file} missing"));
                            } else {
                                // The segment's own duration, as ffprobe reads it after the init segment.
                                let joined = std::env::temp_dir().join(format!(
                                    "mpd-check-{}-{id}-{number}.mp4",
                                    std::process::id()
                                ));
                                let mut bytes = std::fs::read(dir.join(init)).unwrap();
                                bytes.extend(std::fs::read(&seg).unwrap());
                                std::fs::write(&joined, bytes).unwrap();
                                // Frames × frame duration (video), AAC frames × 1024 samples (audio).
                                let pk = ffprobe(
                                    &joined,
                                    &[
                                        "-show_entries",
                                        "packet=pts:stream=codec_type,sample_rate,r_frame_rate",
                                    ],
                                );
                                let st = &pk["streams"][0];
                                let each = if st["codec_type"] == "video" {
                                    let (n, d) = st["r_frame_rate"]
                                        .as_str()
                                        .unwrap()
                                        .split_once('/')
                                        .unwrap();
                                    d.parse::<f64>().unwrap() / n.parse::<f64>().unwrap()
                                } else {
                                    1024.0
                                        / st["sample_rate"]
                                            .as_str()
                                            .unwrap()
                                            .parse::<f64>()
                                            .unwrap()
                                };
                                let real = pk["packets"].as_array().unwrap().len() as f64 * each;
                                let _ = std::fs::remove_file(&joined);
                                if (real - d as f64 / ts).abs() > 0.0015 {
                                    bad.push(format!(
                                        "{id}: {file} lasts {real}s, the MPD says {}s",
                                        d as f64 / ts
                                    ));
                                }
                            }
                            number += 1;
                            time = time.map(|t| t + d);
                            sum += d as f64 / ts;
                        }
                    }
                    if a.attribute("contentType") == Some("video") && (sum - total).abs() > 0.05 {
                        bad.push(format!("{id}: timeline lasts {sum}s, the MPD {total}s"));
                    }
                }
            }
        }
    }
    bad
}

/// Each I-frame playlist entry's byte range (after the init segment) decodes as a keyframe at the time the
/// playlist states.
fn check_iframes(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("iframes.m3u8")).unwrap();
    assert!(text.contains("#EXT-X-I-FRAMES-ONLY"), "{text}");
    let init = std::fs::read(dir.join("init.mp4")).unwrap();
    let (mut stated, mut first_pts) = (0.0, None);
    let mut lines = text.lines();
    let mut n = 0;
    while let Some(l) = lines.next() {
        let Some(d) = l.strip_prefix("#EXTINF:") else {
            continue;
        };
        let dur: f64 = d.trim_end_matches(',').parse().unwrap();
        let range = lines
            .next()
            .unwrap()
            .strip_prefix("#EXT-X-BYTERANGE:")
            .unwrap();
        let (len, off) = range.split_once('@').unwrap();
        let (len, off): (usize, usize) = (len.parse().unwrap(), off.parse().unwrap());
        let seg = std::fs::read(dir.join(lines.next().unwrap())).unwrap();
        let mut bytes = init.clone();
        bytes.extend_from_slice(&seg[off..off + len]);
        let f = std::env::temp_dir().join(format!("iframe-{}-{n}.mp4", std::process::id()));
        std::fs::write(&f, bytes).unwrap();
        let v = ffprobe(&f, &["-show_entries", "frame=key_frame,pict_type,pts_time"]);
        let _ = std::fs::remove_file(&f);
        let fr = &v["frames"][0];
        assert_eq!(fr["key_frame"], 1, "entry {n}: {v}");
        let pts: f64 = fr["pts_time"].as_str().unwrap().parse().unwrap();
        let base = *first_pts.get_or_insert(pts);
        assert!(
            (pts - base - stated).abs() < 0.002,
            "entry {n} decodes at {pts}s, stated {stated}s"
        );
        stated += dur;
        n += 1;
    }
    assert_eq!(n, 4, "{text}");
}

#[test]
fn cmaf_is_one_set_of_segments_for_hls_and_dash_that_every_player_plays() {
    let (out, s) = run(
        "streams-cmaf",
        "cmaf",
        // Lossless, so the stitched segments can be compared with the source frame for frame.
        "    - {name: v, video: {codec: h264, crf: 0, preset: ultrafast}}\n",
        "  thumbnails: {intervalSeconds: 1, width: 64}\n",
    );
    check_status(&s["renditions"][0], "webvtt");
    assert!(
        s["manifest"].as_str().unwrap().ends_with("manifest.mpd"),
        "{s}"
    );
    let problems = check_mpd(&out);
    assert!(problems.is_empty(), "{problems:#?}");
    check_iframes(&out.join("v"));
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    assert!(
        master.contains("#EXT-X-I-FRAME-STREAM-INF:") && master.contains("URI=\"v/iframes.m3u8\"")
    );
    // Seams stay exact: every frame of the segments equals the source's.
    let (a, b) = (frame_md5s(&source()), frame_md5s(&out.join("v/index.m3u8")));
    assert_eq!(a.len(), b.len(), "frame count");
    assert!(a == b, "a CMAF frame differs from the source");
    for (player, manifest) in [
        ("hls", "master.m3u8"),
        ("dash", "manifest.mpd"),
        ("shaka", "manifest.mpd"),
    ] {
        // Shaka also resolves each thumbnail interval (mid-interval times) through its thumbnail API.
        let times = "0.5,1.5,2.5,3.5,4.5,5.5,6.5,7.5";
        let env: &[(&str, &str)] = if player == "shaka" {
            &[("THUMBNAIL_TIMES", times)]
        } else {
            &[]
        };
        let r = play(player, &out, manifest, env);
        check_played(&r, FRAMES, &["en", "fr", "de"], &["en", "es"]);
        check_cues(&r);
        if player == "shaka" {
            check_thumbnails(&out, &r["thumbnails"]);
        }
    }
    let vtt = std::fs::read_to_string(out.join("_thumbnails/thumbnails.vtt")).unwrap();
    assert!(
        vtt.contains("00:00:07.000 --> 00:00:08.000\nsprite_001.jpg#xywh=128,48,64,48"),
        "{vtt}"
    );
}

/// 8 thumbnails of 64x48 (1 s apart) in one 5x5 sheet of 320x240: every interval resolves to its own tile,
/// inside the sheet.
fn check_thumbnails(out: &Path, t: &Value) {
    // Shaka reports the image track by its tile size.
    assert_eq!(
        (t["track"]["width"].as_u64(), t["track"]["height"].as_u64()),
        (Some(64), Some(48)),
        "{t}"
    );
    let sheet = ffprobe(
        &out.join("_thumbnails/sprite_001.jpg"),
        &["-show_entries", "stream=width,height"],
    );
    assert_eq!(
        (
            sheet["streams"][0]["width"].as_u64(),
            sheet["streams"][0]["height"].as_u64()
        ),
        (Some(320), Some(240))
    );
    let all = t["thumbnails"]
        .as_array()
        .unwrap_or_else(|| panic!("no thumbnails: {t}"));
    assert_eq!(all.len(), 8, "{t}");
    for (k, th) in all.iter().enumerate() {
        let (x, y) = (th["x"].as_u64().unwrap(), th["y"].as_u64().unwrap());
        assert_eq!(
            (x, y),
            ((k as u64 % 5) * 64, (k as u64 / 5) * 48),
            "thumbnail {k}: {th}"
        );
        assert_eq!(
            (th["w"].as_u64(), th["h"].as_u64()),
            (Some(64), Some(48)),
            "thumbnail {k}: {th}"
        );
        assert!(x + 64 <= 320 && y + 48 <= 240);
        assert!(
            th["uris"][0]
                .as_str()
                .unwrap()
                .ends_with("_thumbnails/sprite_001.jpg"),
            "{th}"
        );
    }
}

#[test]
fn av1_cmaf_plays_in_hls_js_and_dash_js() {
    let (out, _) = run(
        "streams-cmaf-av1",
        "cmaf",
        "    - {name: av1, video: {codec: av1, width: 160, crf: 40, preset: \"12\"}}\n",
        "  streams: {audio: {languages: [fr]}, subtitles: {none: true}}\n",
    );
    let problems = check_mpd(&out);
    assert!(problems.is_empty(), "{problems:#?}");
    let mpd = std::fs::read_to_string(out.join("manifest.mpd")).unwrap();
    assert!(mpd.contains("codecs=\"av01."), "{mpd}");
    for (player, manifest) in [("hls", "master.m3u8"), ("dash", "manifest.mpd")] {
        let r = play(player, &out, manifest, &[]);
        check_played(&r, FRAMES, &["fr"], &[]);
    }
}

/// 4 s of 10-bit HEVC in BT.2020/PQ whose SEI (not the container) carries HDR10 mastering display and
/// content light level metadata, a keyframe a second.
fn hdr10_source() -> PathBuf {
    fixture(
        "hdr10.mkv",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=4",
            "-pix_fmt",
            "yuv420p10le",
            "-c:v",
            "libx265",
            "-preset",
            "ultrafast",
            "-x265-params",
            "keyint=25:min-keyint=25:colorprim=bt2020:transfer=smpte2084:colormatrix=bt2020nc:\
             master-display=G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1):\
             max-cll=1000,400:hdr10=1:log-level=error",
            "-color_primaries",
            "bt2020",
            "-color_trc",
            "smpte2084",
            "-colorspace",
            "bt2020nc",
        ],
    )
}

#[test]
fn hdr10_metadata_reaches_every_chunk_and_h264_is_tone_mapped_to_sdr() {
    let out = out_dir("streams-hdr10");
    let yaml = job_yaml(
        &hdr10_source(),
        &out,
        "cmaf",
        "    - {name: hevc, video: {codec: hevc, crf: 30, preset: ultrafast}}\n    - {name: av1, video: {codec: av1, crf: 45, preset: \"12\"}}\n    - {name: sdr, video: {codec: h264, crf: 30, preset: ultrafast}}\n",
        "  chunking: {targetSeconds: 1}\n  hardware: software\n",
    );
    let s = tessera_ok(&out, &yaml, &["--workers", "2"]);
    assert_eq!(s["chunks"].as_u64(), Some(4), "{s}");
    // The first frame of every chunk, decoded on its own (init + that segment), carries the source's values.
    for r in ["hevc", "av1"] {
        let init = std::fs::read(out.join(r).join("init.mp4")).unwrap();
        for i in 0..4 {
            let mut bytes = init.clone();
            bytes.extend(std::fs::read(out.join(r).join(format!("seg_{i:05}.m4s"))).unwrap());
            let f = target_dir().join(format!("hdr-{r}-{i}.mp4"));
            std::fs::write(&f, bytes).unwrap();
            let v = ffprobe(
                &f,
                &["-read_intervals", "%+#1", "-show_entries", "frame_side_data=side_data_type,red_x,green_y,max_luminance,min_luminance,max_content,max_average:stream=color_transfer,color_primaries,pix_fmt"],
            );
            let sd = v["frames"][0]["side_data_list"]
                .as_array()
                .unwrap_or_else(|| panic!("{r} chunk {i}: no side data: {v}"));
            let md = sd
                .iter()
                .find(|d| d["side_data_type"] == "Mastering display metadata")
                .unwrap_or_else(|| panic!("{r} chunk {i}: {v}"));
            // HEVC stores 1/50000 and 1/10000 units, AV1 16- and 8/14-bit fixed point: compare values.
            let val = |k: &str| -> f64 {
                let (n, d) = md[k]
                    .as_str()
                    .and_then(|v| v.split_once('/'))
                    .unwrap_or_else(|| panic!("{k}: {md}"));
                n.parse::<f64>().unwrap() / d.parse::<f64>().unwrap()
            };
            for (k, want, tol) in [
                ("red_x", 0.68, 1e-3),
                ("green_y", 0.69, 1e-3),
                ("max_luminance", 1000.0, 0.5),
                ("min_luminance", 0.0001, 5e-5),
            ] {
                assert!(
                    (val(k) - want).abs() <= tol,
                    "{r} chunk {i}: {k} = {}: {v}",
                    val(k)
                );
            }
            let cl = sd
                .iter()
                .find(|d| d["side_data_type"] == "Content light level metadata")
                .unwrap_or_else(|| panic!("{r} chunk {i}: {v}"));
            assert_eq!(
                (cl["max_content"].as_u64(), cl["max_average"].as_u64()),
                (Some(1000), Some(400)),
                "{r} chunk {i}: {v}"
            );
            let st = &v["streams"][0];
            assert_eq!(
                (st["color_transfer"].as_str(), st["pix_fmt"].as_str()),
                (Some("smpte2084"), Some("yuv420p10le")),
                "{r}: {v}"
            );
        }
    }
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    let range = |name: &str| {
        let lines: Vec<&str> = master.lines().collect();
        let i = lines
            .iter()
            .position(|l| *l == format!("{name}/index.m3u8"))
            .unwrap();
        lines[i - 1].contains("VIDEO-RANGE=PQ")
    };
    assert!(range("hevc") && range("av1") && !range("sdr"), "{master}");
    let mpd = std::fs::read_to_string(out.join("manifest.mpd")).unwrap();
    assert!(mpd.contains("<EssentialProperty schemeIdUri=\"urn:mpeg:mpegB:cicp:TransferCharacteristics\" value=\"16\"/>"), "{mpd}");
    // The H.264 rendition is SDR BT.709, says so, and carries no HDR metadata.
    let v = ffprobe(
        &out.join("sdr/index.m3u8"),
        &[
            "-read_intervals",
            "%+#1",
            "-show_entries",
            "stream=color_transfer,color_primaries,pix_fmt:frame_side_data=side_data_type",
        ],
    );
    let st = &v["streams"][0];
    assert_eq!(
        (
            st["color_transfer"].as_str(),
            st["color_primaries"].as_str(),
            st["pix_fmt"].as_str()
        ),
        (Some("bt709"), Some("bt709"), Some("yuv420p")),
        "{v}"
    );
    assert!(!v.to_string().contains("Mastering display"), "{v}");
    let sdr = &s["renditions"][2];
    assert!(
        sdr["leftOut"]
            .to_string()
            .contains("tone-mapped to SDR BT.709"),
        "{sdr}"
    );
    // AV1 plays in a real player; this Chromium has no HEVC decoder (checked above with ffprobe).
    let r = play("dash", &out, "manifest.mpd", &[]);
    assert_eq!(r["ended"], true, "{r}");
    assert_eq!(r["frames"].as_u64(), Some(100), "{r}");
}

/// 4 s of H.264 (no B-frames, a keyframe a second) whose every frame carries CEA-608 caption data in an
/// ATSC A/53 SEI: FFmpeg cannot insert captions into video, so the SEI NAL units are written here, one after
/// each access unit's parameter sets (before its slice) in the raw stream.
fn captioned_source() -> PathBuf {
    let dir = target_dir();
    let path = dir.join("captions.mp4");
    if path.exists() {
        return path;
    }
    let raw = fixture(
        "captions-raw.h264",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=4",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-bf",
            "0",
            "-g",
            "25",
            "-x264-params",
            "aud=1",
            "-f",
            "h264",
        ],
    );
    let data = std::fs::read(&raw).unwrap();
    // T.35 (USA, ATSC) "GA94", cc_data: process flags + 2 triplets ("HI" in field 1, then padding), markers.
    let payload = [
        0xB5, 0x00, 0x31, b'G', b'A', b'9', b'4', 0x03, 0xC2, 0xFF, 0xFC, 0xC8, 0x49, 0xFD, 0x80,
        0x80, 0xFF,
    ];
    let mut sei = vec![0, 0, 0, 1, 0x06, 0x04, payload.len() as u8];
    sei.extend_from_slice(&payload);
    sei.push(0x80);
    // NAL units start after 00 00 01 (x264 writes 4-byte start codes before parameter sets, 3-byte ones
    // before slices): the SEI goes before the start code of each access unit's first slice.
    let starts: Vec<usize> = (0..data.len().saturating_sub(3))
        .filter(|&p| data[p..p + 3] == [0, 0, 1])
        .collect();
    let mut out = Vec::with_capacity(data.len() + 30 * 100);
    let (mut copied, mut pending) = (0, false);
    for &p in &starts {
        let kind = data[p + 3] & 0x1f;
        if kind == 9 {
            pending = true;
        }
        if pending && (kind == 1 || kind == 5) {
            let at = if p > 0 && data[p - 1] == 0 { p - 1 } else { p };
            out.extend_from_slice(&data[copied..at]);
            out.extend_from_slice(&sei);
            copied = at;
            pending = false;
        }
    }
    out.extend_from_slice(&data[copied..]);
    let with_sei = dir.join("captions-sei.h264");
    std::fs::write(&with_sei, out).unwrap();
    fixture(
        "captions.mp4",
        &[
            "-framerate",
            "25",
            "-i",
            with_sei.to_str().unwrap(),
            "-c",
            "copy",
        ],
    )
}

/// Frames carrying A/53 caption side data, decoded from `path`.
fn caption_frames(path: &Path) -> usize {
    let v = ffprobe(
        path,
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame_side_data=side_data_type",
        ],
    );
    v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.to_string().contains("ATSC A53 Part 4 Closed Captions"))
        .count()
}

#[test]
fn cea608_captions_are_kept_in_every_chunk_of_h264_and_reported_for_hevc() {
    let src = captioned_source();
    assert_eq!(
        caption_frames(&src),
        100,
        "the fixture carries captions on every frame"
    );
    let out = out_dir("streams-captions");
    let yaml = job_yaml(
        &src,
        &out,
        "hls",
        "    - {name: small, video: {codec: h264, width: 160, crf: 30, preset: ultrafast}}\n    - {name: hevc, video: {codec: hevc, crf: 30, preset: ultrafast}}\n",
        "  chunking: {targetSeconds: 1}\n  hardware: software\n",
    );
    let s = tessera_ok(&out, &yaml, &["--workers", "2"]);
    assert_eq!(s["chunks"].as_u64(), Some(4), "{s}");
    let small = out.join("small/index.m3u8");
    assert_eq!(
        caption_frames(&small),
        100,
        "every frame of every chunk keeps its captions"
    );
    // ffprobe's stream line says "Closed Captions" (its JSON field stays 0 unless it decodes).
    let says_cc = |p: &Path| {
        let o = std::process::Command::new("ffprobe")
            .arg("-hide_banner")
            .arg(p)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stderr).contains("Closed Captions")
    };
    assert!(
        says_cc(&small),
        "ffprobe reports Closed Captions in the H.264 rendition"
    );
    assert!(
        !says_cc(&out.join("hevc/index.m3u8")),
        "and none in the HEVC one"
    );
    let r0 = &s["renditions"][0];
    assert!(
        r0["streams"].to_string().contains("\"kind\":\"captions\""),
        "{r0}"
    );
    let r1 = &s["renditions"][1];
    assert!(
        r1["leftOut"].to_string().contains("CEA-608/708 captions"),
        "{r1}"
    );
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    assert!(
        master.contains("#EXT-X-MEDIA:TYPE=CLOSED-CAPTIONS,GROUP-ID=\"cc\""),
        "{master}"
    );
    let lines: Vec<&str> = master.lines().collect();
    let inf = |name: &str| {
        lines[lines
            .iter()
            .position(|l| *l == format!("{name}/index.m3u8"))
            .unwrap()
            - 1]
    };
    assert!(
        inf("small").contains("CLOSED-CAPTIONS=\"cc\"") && !inf("hevc").contains("CLOSED-CAPTIONS"),
        "{master}"
    );
}

/// An HEVC MP4 that declares Dolby Vision (profile 8.1: an HDR10-compatible base layer with RPUs): a
/// `dvcC` configuration box is added to its `hvc1` sample entry, and every enclosing box grows by its size.
/// The index sits after the media data, so no sample offset moves.
fn dolby_vision_source() -> PathBuf {
    let path = target_dir().join("dovi.mp4");
    if path.exists() {
        return path;
    }
    let plain = fixture(
        "dovi-plain.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=2",
            "-pix_fmt",
            "yuv420p10le",
            "-c:v",
            "libx265",
            "-preset",
            "ultrafast",
            "-tag:v",
            "hvc1",
            "-x265-params",
            "keyint=25:log-level=error",
        ],
    );
    let mut d = std::fs::read(plain).unwrap();
    let find = |d: &[u8], kind: &[u8; 4], from: usize| {
        d[from..]
            .windows(4)
            .position(|w| w == kind)
            .map(|p| from + p - 4)
    };
    // moov/trak/mdia/minf/stbl/stsd/hvc1, each found after its parent.
    // The top-level boxes are walked (media data could hold any bytes); inside moov a search suffices.
    let mut moov = 0;
    while &d[moov + 4..moov + 8] != b"moov" {
        moov += u32::from_be_bytes(d[moov..moov + 4].try_into().unwrap()) as usize;
    }
    let mut path_at = vec![moov];
    let mut from = moov + 8;
    for kind in [b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"hvc1"] {
        let at = find(&d, kind, from).unwrap_or_else(|| panic!("no {kind:?} box"));
        path_at.push(at);
        from = at + 8;
    }
    let mut dvcc = vec![0, 0, 0, 32, b'd', b'v', b'c', b'C', 1, 0];
    let bits: u16 = (8 << 9) | (4 << 3) | (1 << 2) | 1;
    dvcc.extend_from_slice(&bits.to_be_bytes());
    dvcc.extend_from_slice(&[0x10, 0, 0, 0]);
    dvcc.extend_from_slice(&[0; 16]);
    assert_eq!(dvcc.len(), 32);
    let hvc1 = *path_at.last().unwrap();
    let hvc1_end = hvc1 + u32::from_be_bytes(d[hvc1..hvc1 + 4].try_into().unwrap()) as usize;
    for &at in &path_at {
        let size = u32::from_be_bytes(d[at..at + 4].try_into().unwrap()) + 32;
        d[at..at + 4].copy_from_slice(&size.to_be_bytes());
    }
    d.splice(hvc1_end..hvc1_end, dvcc);
    std::fs::write(&path, d).unwrap();
    path
}

#[test]
fn dolby_vision_is_reported_as_left_out() {
    let src = dolby_vision_source();
    let probe = ffprobe(
        &src,
        &[
            "-show_entries",
            "stream_side_data=side_data_type,dv_profile",
        ],
    );
    assert!(
        probe.to_string().contains("DOVI configuration record"),
        "the fixture declares Dolby Vision: {probe}"
    );
    let out = out_dir("streams-dovi");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: hevc, video: {codec: hevc, crf: 30, preset: ultrafast}}\n",
        "  hardware: software\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let left = s["renditions"][0]["leftOut"].to_string();
    assert!(left.contains("Dolby Vision metadata is not carried"), "{s}");
    // The output is plain HEVC: no Dolby Vision signalling that would no longer be true.
    let o = ffprobe(
        &out.join("hevc.mp4"),
        &["-show_entries", "stream_side_data=side_data_type"],
    );
    assert!(!o.to_string().contains("DOVI"), "{o}");
}
