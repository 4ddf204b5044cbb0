//! End-to-end tests of the media engine: the `tessera` binary on real files, real FFmpeg libraries, outputs
//! checked with ffprobe and frame checksums.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// 15 s, 640x360, 25 fps, three scenes (hard cuts), B-frames, stereo 48 kHz AAC.
fn cfr_scenes() -> PathBuf {
    fixture(
        "cfr25-scenes.mp4",
        &[
            "-filter_complex",
            "testsrc2=s=640x360:r=25:d=5[a];mandelbrot=s=640x360:r=25,trim=duration=5,setpts=PTS-STARTPTS[b];\
             smptehdbars=s=640x360:r=25:d=5[c];[a][b][c]concat=n=3:v=1:a=0,format=yuv420p[v];\
             sine=f=440:d=15:r=48000,aformat=channel_layouts=stereo[s]",
            "-map", "[v]", "-map", "[s]", "-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-bf", "3",
            "-c:a", "aac", "-b:a", "96k",
        ],
    )
}

/// 10 s, 320x240, 30000/1001 fps, open GOP with B-pyramid (leading pictures cross every keyframe), mono AAC.
fn ntsc_open_gop() -> PathBuf {
    fixture(
        "ntsc-opengop.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=30000/1001:duration=10",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:duration=10:sample_rate=44100",
            "-c:v",
            "libx264",
            "-x264-params",
            "keyint=45:min-keyint=10:open-gop=1:bframes=3:b-pyramid=normal",
            "-c:a",
            "aac",
        ],
    )
}

/// 6 s, odd size 321x241, variable frame rate (25 fps, then 12.5 fps), no audio.
fn vfr_odd() -> PathBuf {
    fixture(
        "vfr-odd.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=321x241:rate=25:duration=6",
            "-vf",
            "setpts='if(lt(N,50),N*0.04,2+(N-50)*0.08)/TB'",
            "-fps_mode",
            "passthrough",
            "-c:v",
            "libx264",
            "-g",
            "20",
            "-an",
        ],
    )
}

/// 3 s, 320x240, 25 fps, a keyframe every second, mono audio.
fn short() -> PathBuf {
    fixture(
        "short.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=3",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=500:duration=3",
            "-c:v",
            "libx264",
            "-g",
            "25",
            "-c:a",
            "aac",
        ],
    )
}

/// 5 s, 320x240, with a display matrix rotating it by 90° (FFmpeg 5.1's muxer ignores `rotate=` metadata,
/// so the track header's matrix is written directly).
fn rotated() -> PathBuf {
    let dir = target_dir();
    let path = dir.join("rotated.mp4");
    if !path.exists() {
        let plain = fixture(
            "rotated-plain.mp4",
            &[
                "-f",
                "lavfi",
                "-i",
                "testsrc2=size=320x240:rate=25:duration=5",
                "-c:v",
                "libx264",
                "-g",
                "25",
                "-an",
            ],
        );
        let mut d = std::fs::read(plain).unwrap();
        let i = d.windows(4).position(|w| w == b"tkhd").unwrap();
        let off = i + 4 + 4 + if d[i + 4] == 0 { 20 } else { 32 } + 16;
        let m: [i32; 9] = [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x4000_0000];
        for (k, v) in m.iter().enumerate() {
            d[off + 4 * k..off + 4 * k + 4].copy_from_slice(&v.to_be_bytes());
        }
        let tmp = dir.join(format!("rotated.{}.partial.mp4", std::process::id()));
        std::fs::write(&tmp, d).unwrap();
        std::fs::rename(tmp, &path).unwrap();
    }
    path
}

fn assert_close_sets(src: &[f64], out: &[f64], tol: f64, what: &str) {
    assert_eq!(src.len(), out.len(), "{what}: frame count");
    let mut s = src.to_vec();
    s.sort_by(f64::total_cmp);
    for (i, (a, b)) in s.iter().zip(out).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "{what}: frame {i} at {b}s, source {a}s (dropped or duplicated frame at a seam?)"
        );
    }
}

fn assert_strictly_increasing(v: &[f64], what: &str) {
    for w in v.windows(2) {
        assert!(w[1] > w[0], "{what}: {} then {}", w[0], w[1]);
    }
}

/// Frames, duration, A/V sync, timestamps and faststart of one MP4 output against its source.
fn check_mp4_against_source(src: &Path, out: &Path) {
    let (sv, ov) = (video(src), video(out));
    let frames = num(&sv, "nb_read_frames");
    assert_eq!(
        num(&ov, "nb_read_frames"),
        frames,
        "{}: frame count",
        out.display()
    );
    let st = frame_times(src);
    let ot = frame_times(out);
    assert_strictly_increasing(&ot, "output frame times");
    assert_strictly_increasing(&packet_dts(out), "output packet dts");
    let frame_dur = (st.last().unwrap() - st[0]) / (st.len() as f64 - 1.0);
    let (sd, od) = (num(&sv, "duration"), num(&ov, "duration"));
    assert!(
        (sd - od).abs() <= frame_dur + 1e-6,
        "{}: duration {od} vs source {sd}",
        out.display()
    );
    // Every source frame appears exactly once, at its own time (relative to the first).
    let s0: Vec<f64> = st.iter().map(|t| t - st[0]).collect();
    let o0: Vec<f64> = ot.iter().map(|t| t - ot[0]).collect();
    assert_close_sets(&s0, &o0, 1e-3, &out.display().to_string());
    if let Some(a) = audio(out) {
        let ad = num(&a, "duration");
        assert!(
            (ad - od).abs() <= 0.040,
            "{}: audio {ad}s vs video {od}s",
            out.display()
        );
    }
    // Closed GOPs: nothing after a keyframe (in decode order) is shown before it, so every keyframe is a
    // clean cut point (what lets chunks be stitched and HLS segments start anywhere there is a keyframe).
    let pk = ffprobe(
        out,
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts,flags",
        ],
    );
    let pk: Vec<(i64, bool)> = pk["packets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pts"].as_i64().unwrap(),
                p["flags"].as_str().unwrap().starts_with('K'),
            )
        })
        .collect();
    let mut suffix_min = vec![i64::MAX; pk.len() + 1];
    for i in (0..pk.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min(pk[i].0);
    }
    for (i, (pts, key)) in pk.iter().enumerate() {
        assert!(
            !key || suffix_min[i + 1] >= *pts,
            "{}: open GOP at keyframe pts {pts}",
            out.display()
        );
    }
    let bytes = std::fs::read(out).unwrap();
    let pos = |tag: &[u8]| bytes.windows(4).position(|w| w == tag).unwrap();
    assert!(
        pos(b"moov") < pos(b"mdat"),
        "{}: index is not at the front",
        out.display()
    );
}

#[test]
fn cfr_renditions_are_frame_exact_with_audio_in_sync() {
    let src = cfr_scenes();
    let out = out_dir("cfr");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: 360p, video: {codec: h264, height: 360, crf: 23, preset: veryfast}, audio: {codec: aac, bitrate: 128k}}\n    - {name: 180p, video: {codec: h264, height: 180, crf: 28, preset: veryfast}}\n",
        "  chunking: {targetSeconds: 3}\n",
    );
    let s = tessera_ok(&out, &yaml, &["--workers", "2"]);
    assert!(
        s["chunks"].as_u64().unwrap() >= 4,
        "expected several chunks: {s}"
    );
    for i in 0..2 {
        check_mp4_against_source(&src, &output(&s, i));
    }
    let v = video(&output(&s, 1));
    assert_eq!((num(&v, "width"), num(&v, "height")), (320.0, 180.0));
    // Nothing but the outputs (and the job file's folder) is left behind.
    assert_eq!(listing(&out), ["180p.mp4", "360p.mp4"]);
}

#[test]
fn ntsc_open_gop_source_is_frame_exact() {
    let src = ntsc_open_gop();
    let out = out_dir("ntsc");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: a, video: {codec: h264, height: 180, preset: veryfast}}\n",
        "  chunking: {targetSeconds: 1}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    assert!(s["chunks"].as_u64().unwrap() >= 5, "{s}");
    check_mp4_against_source(&src, &output(&s, 0));
    let reason = s["renditions"][0]["encoderReason"].as_str().unwrap();
    let encoder = s["renditions"][0]["encoder"].as_str().unwrap();
    // Decoding: a GPU where one opens, else software with the reason (here: no CUDA or VA-API device).
    let dec = &s["decoder"];
    match dec["method"].as_str().unwrap() {
        "software" => assert!(dec["reason"].as_str().unwrap().contains("cuda"), "{dec}"),
        m => assert!(m == "cuda" || m == "vaapi", "{dec}"),
    }
    // `hardware: auto` tried NVENC first; on a machine without it the reason says what failed and why.
    assert!(
        encoder == "h264_nvenc"
            || reason.contains("h264_nvenc failed to open") && reason.ends_with("used libx264"),
        "{reason}"
    );
}

#[test]
fn probe_reads_keyframes_from_the_container_index() {
    let ntsc = ntsc_open_gop();
    let mkv = fixture(
        "ntsc-opengop.mkv",
        &["-i", ntsc.to_str().unwrap(), "-c", "copy"],
    );
    let ts = fixture(
        "ntsc-opengop.ts",
        &["-i", ntsc.to_str().unwrap(), "-c", "copy"],
    );
    for (src, source, exact) in [
        (&ntsc, "container index", true),
        (&mkv, "container index", false),
        (&ts, "packet scan", true),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("probe")
            .arg(src)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(p["keyframe_source"], source, "{}", src.display());
        assert_eq!(
            p["keyframes"].as_array().unwrap().len(),
            7,
            "{}",
            src.display()
        );
        assert_eq!(p["video"]["vfr"], false, "{}", src.display());
        assert_eq!(p["video"]["fps"], serde_json::json!([30000, 1001]));
        if exact {
            assert_eq!(p["video"]["frames"], 300, "{}", src.display());
        }
    }
}

/// The seam test: a lossless chunked encode decodes to exactly the source's frames.
#[test]
fn lossless_chunked_encode_is_frame_identical_to_the_source() {
    // The same open-GOP stream in Matroska (keyframes from its cues) and MPEG-TS (no index: packet scan,
    // and seeks that overshoot) must cut exactly as well.
    let ntsc = ntsc_open_gop();
    let mkv = fixture(
        "ntsc-opengop.mkv",
        &["-i", ntsc.to_str().unwrap(), "-c", "copy"],
    );
    let ts = fixture(
        "ntsc-opengop.ts",
        &["-i", ntsc.to_str().unwrap(), "-c", "copy"],
    );
    for (name, src) in [
        ("ll-ntsc", ntsc.clone()),
        ("ll-cfr", cfr_scenes()),
        ("ll-mkv", mkv),
        ("ll-ts", ts),
    ] {
        let out = out_dir(name);
        let yaml = job_yaml(
            &src,
            &out,
            "mp4",
            "    - {name: same, video: {codec: h264, crf: 0, preset: ultrafast}, audio: {codec: none}}\n",
            "  chunking: {targetSeconds: 1}\n  hardware: software\n",
        );
        let s = tessera_ok(&out, &yaml, &["--workers", "3"]);
        assert!(s["chunks"].as_u64().unwrap() >= 5, "{name}: {s}");
        let (a, b) = (frame_md5s(&src), frame_md5s(&output(&s, 0)));
        assert_eq!(a.len(), b.len(), "{name}: frame count");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("{name}: frame {i} differs from the source");
        }
    }
}

#[test]
fn vfr_timestamps_survive_odd_sizes_become_even_and_no_audio_works() {
    let src = vfr_odd();
    let out = out_dir("vfr");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: full, video: {codec: h264}}\n    - {name: small, video: {codec: h264, height: 101}}\n",
        "  chunking: {targetSeconds: 1}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    assert_eq!(s["source"]["vfr"], true);
    let full = output(&s, 0);
    assert_close_sets(&frame_times(&src), &frame_times(&full), 1e-3, "vfr");
    let (v0, v1) = (video(&full), video(&output(&s, 1)));
    assert_eq!((num(&v0, "width"), num(&v0, "height")), (320.0, 240.0));
    assert_eq!(
        (num(&v1, "width") as u32 % 2, num(&v1, "height")),
        (0, 102.0)
    );
    assert!(audio(&full).is_none());
}

#[test]
fn rotation_survives_and_sizes_refer_to_the_displayed_picture() {
    let src = rotated();
    let out = out_dir("rot");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: r, video: {codec: h264, height: 100}}\n",
        "  chunking: {targetSeconds: 1}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let v = video(&output(&s, 0));
    let rot = |v: &serde_json::Value| v["side_data_list"][0]["rotation"].as_i64();
    assert_eq!(rot(&video(&src)), Some(-90));
    assert_eq!(rot(&v), Some(-90), "{v}");
    // Shown as 240x320 → 75x100; stored (before rotation) as 100x76 (even).
    assert_eq!((num(&v, "width"), num(&v, "height")), (100.0, 76.0));
}

#[test]
fn hls_has_a_master_playlist_and_one_segment_per_chunk() {
    let src = cfr_scenes();
    let out = out_dir("hls");
    let yaml = job_yaml(
        &src,
        &out,
        "hls",
        "    - {name: 360p, video: {codec: h264, height: 360, preset: veryfast}}\n    - {name: 180p, video: {codec: h264, height: 180, preset: veryfast}}\n",
        "  chunking: {targetSeconds: 4}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let chunks = s["chunks"].as_u64().unwrap() as usize;
    assert_eq!(listing(&out), ["180p", "360p", "master.m3u8"]);
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    assert!(
        master.contains("RESOLUTION=640x360")
            && master.contains("360p/index.m3u8")
            && master.contains("180p/index.m3u8"),
        "{master}"
    );
    assert!(master.contains("CODECS=\"avc1."), "{master}");
    let frames = num(&video(&src), "nb_read_frames");
    for r in ["360p", "180p"] {
        let index = out.join(r).join("index.m3u8");
        let text = std::fs::read_to_string(&index).unwrap();
        assert!(
            text.contains("#EXT-X-PLAYLIST-TYPE:VOD") && text.contains("#EXT-X-ENDLIST"),
            "{text}"
        );
        assert_eq!(
            text.matches("#EXTINF").count(),
            chunks,
            "{r}: one segment per chunk\n{text}"
        );
        assert_eq!(num(&video(&index), "nb_read_frames"), frames, "{r}");
        let (a, v) = (stream_end(&index, "a:0"), stream_end(&index, "v:0"));
        assert!(
            (a - v).abs() <= 0.040,
            "{r}: audio ends at {a}s, video at {v}s"
        );
    }
}

#[test]
fn real_clips_transcode_frame_exactly() {
    for clip in ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"] {
        let src = sample(clip);
        let out = out_dir(&format!("clip-{clip}"));
        let yaml = job_yaml(
            &src,
            &out,
            "mp4",
            "    - {name: a, video: {codec: h264, height: 144, preset: veryfast}}\n",
            "  chunking: {targetSeconds: 2}\n",
        );
        let s = tessera_ok(&out, &yaml, &[]);
        check_mp4_against_source(&src, &output(&s, 0));
    }
}

fn ffmpeg_metric(out: &Path, src: &Path, w: u32, h: u32, filter: &str, key: &str) -> f64 {
    let o = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-i"])
        .arg(out)
        .arg("-i")
        .arg(src)
        .args([
            "-lavfi",
            &format!("[1:v]scale={w}:{h}:flags=bicubic[r];[0:v][r]{filter}"),
            "-f",
            "null",
            "-",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .rev()
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no {key} in {err}"));
    let v = line
        .split(key)
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    v.parse().unwrap()
}

#[test]
fn quality_report_matches_ffmpegs_psnr_and_ssim_filters() {
    let src = short();
    let out = out_dir("quality");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: q, video: {codec: h264, height: 180, crf: 30}}\n",
        "  quality: {metrics: [psnr, ssim]}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let r = &s["renditions"][0];
    let (psnr, ssim) = (r["psnr"].as_f64().unwrap(), r["ssim"].as_f64().unwrap());
    let (w, h) = (
        r["width"].as_u64().unwrap() as u32,
        r["height"].as_u64().unwrap() as u32,
    );
    let f_psnr = ffmpeg_metric(&output(&s, 0), &src, w, h, "psnr", "average:");
    let f_ssim = ffmpeg_metric(&output(&s, 0), &src, w, h, "ssim", "All:");
    assert!(
        (psnr - f_psnr).abs() < 0.01,
        "PSNR {psnr} vs ffmpeg {f_psnr}"
    );
    assert!(
        (ssim - f_ssim).abs() < 0.0005,
        "SSIM {ssim} vs ffmpeg {f_ssim}"
    );
    assert!(psnr > 25.0 && ssim > 0.8);
}

#[test]
fn hevc_av1_and_bitrate_renditions_are_frame_exact() {
    let src = short();
    let out = out_dir("codecs");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: hevc, video: {codec: hevc, crf: 32, preset: ultrafast}}\n    - {name: av1, video: {codec: av1, crf: 45, preset: \"12\"}, audio: {codec: opus}}\n    - {name: vbr, video: {codec: h264, bitrate: 300k, maxrate: 450k}, audio: {codec: copy}}\n",
        "  chunking: {targetSeconds: 1}\n  hardware: software\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    assert_eq!(s["chunks"], 3);
    let frames = num(&video(&src), "nb_read_frames");
    for (i, codec, acodec) in [(0, "hevc", "aac"), (1, "av1", "opus"), (2, "h264", "aac")] {
        let o = output(&s, i);
        let v = video(&o);
        assert_eq!(
            (v["codec_name"].as_str().unwrap(), num(&v, "nb_read_frames")),
            (codec, frames),
            "{}",
            o.display()
        );
        assert_eq!(audio(&o).unwrap()["codec_name"], acodec);
    }
}

fn assert_fails(name: &str, yaml_for: impl Fn(&Path) -> String, code: i32, needles: &[&str]) {
    let out = out_dir(name);
    let target = out.join("outputs");
    let r = tessera_run(&out, &yaml_for(&target), &[]);
    let err = r.stderr();
    assert_eq!(r.output.status.code(), Some(code), "{name}: {err}");
    for n in needles {
        assert!(err.contains(n), "{name}: {n:?} not in {err:?}");
    }
    assert!(
        listing(&target).is_empty(),
        "{name}: left {:?}",
        listing(&target)
    );
}

#[test]
fn bad_input_fails_with_a_message_naming_the_field_or_file_and_leaves_nothing() {
    let dir = target_dir();
    let garbage = dir.join("garbage.mp4");
    std::fs::write(
        &garbage,
        (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let empty = dir.join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    // moov at the end, cut in half: no index.
    let whole = std::fs::read(cfr_scenes()).unwrap();
    let truncated = dir.join("truncated.mp4");
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let audio_only = fixture(
        "audio-only.m4a",
        &["-f", "lavfi", "-i", "sine=d=2", "-c:a", "aac"],
    );
    let missing = dir.join("does-not-exist.mp4");
    let good = short();
    let r1 = "    - {name: a, video: {codec: h264}}\n";

    for (name, input) in [
        ("garbage", &garbage),
        ("empty", &empty),
        ("truncated", &truncated),
        ("missing", &missing),
    ] {
        let shown = input.display().to_string();
        assert_fails(name, |o| job_yaml(input, o, "mp4", r1, ""), 1, &[&shown]);
    }
    assert_fails(
        "audio-only",
        |o| job_yaml(&audio_only, o, "mp4", r1, ""),
        1,
        &["no video stream", "audio aac"],
    );
    assert_fails(
        "unknown-codec",
        |o| {
            job_yaml(
                &good,
                o,
                "mp4",
                "    - {name: a, video: {codec: h265}}\n",
                "",
            )
        },
        2,
        &["spec.renditions[0].video.codec", "h265"],
    );
    assert_fails(
        "crf-and-bitrate",
        |o| {
            job_yaml(
                &good,
                o,
                "mp4",
                "    - {name: a, video: {codec: h264, crf: 20, bitrate: 1M}}\n",
                "",
            )
        },
        2,
        &["spec.renditions[0].video"],
    );
    assert_fails(
        "traversal",
        |o| {
            job_yaml(
                &good,
                o,
                "mp4",
                "    - {name: ../../etc, video: {codec: h264}}\n",
                "",
            )
        },
        2,
        &["spec.renditions[0].name"],
    );
    assert_fails(
        "bad-yaml",
        |o| format!("{}\n  renditions: [", job_yaml(&good, o, "mp4", r1, "")),
        2,
        &["invalid YAML", ".yaml"],
    );
}

#[test]
fn interrupting_a_run_leaves_no_partial_output_or_scratch() {
    let src = cfr_scenes();
    let out = out_dir("interrupt");
    let target = out.join("outputs");
    let tmp = out.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let job = out.join("job.yaml");
    std::fs::write(
        &job,
        job_yaml(
            &src,
            &target,
            "mp4",
            "    - {name: a, video: {codec: h264, preset: veryslow}}\n",
            "  chunking: {targetSeconds: 2}\n",
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("run")
        .arg(&job)
        .env("TMPDIR", &tmp)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Chunk files appear in the scratch folder when encoding starts; that is the moment to interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let encoding = || {
        listing(&tmp)
            .iter()
            .any(|d| listing(&tmp.join(d)).iter().any(|f| f.ends_with(".tpk")))
    };
    while !encoding() {
        assert!(
            std::time::Instant::now() < deadline,
            "encoding never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "tessera exited before it could be interrupted"
        );
        std::thread::yield_now();
    }
    let ok = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listing(&target).is_empty(), "left {:?}", listing(&target));
    assert!(listing(&tmp).is_empty(), "scratch left {:?}", listing(&tmp));
}

#[test]
fn ten_bit_hevc_keeps_its_depth_where_the_codec_can() {
    let src = fixture(
        "hevc10.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=2",
            "-pix_fmt",
            "yuv420p10le",
            "-c:v",
            "libx265",
            "-x265-params",
            "log-level=error:keyint=25",
        ],
    );
    let out = out_dir("hevc10");
    let yaml = job_yaml(
        &src,
        &out,
        "mp4",
        "    - {name: avc, video: {codec: h264, preset: ultrafast}}\n    - {name: hevc, video: {codec: hevc, preset: ultrafast}}\n",
        "  chunking: {targetSeconds: 1}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    assert_eq!(s["chunks"], 2);
    for (i, pix) in [(0, "yuv420p"), (1, "yuv420p10le")] {
        let v = video(&output(&s, i));
        assert_eq!(
            (v["pix_fmt"].as_str().unwrap(), num(&v, "nb_read_frames")),
            (pix, 50.0),
            "{v}"
        );
    }
}

#[test]
fn hevc_hls_uses_fragmented_mp4_tagged_for_apple_players() {
    let src = short();
    let out = out_dir("hls-hevc");
    let yaml = job_yaml(
        &src,
        &out,
        "hls",
        "    - {name: hevc, video: {codec: hevc, preset: ultrafast}}\n",
        "  chunking: {targetSeconds: 1}\n",
    );
    let s = tessera_ok(&out, &yaml, &[]);
    let dir = out.join("hevc");
    assert_eq!(
        listing(&dir),
        [
            "index.m3u8",
            "init.mp4",
            "seg_00000.m4s",
            "seg_00001.m4s",
            "seg_00002.m4s"
        ]
    );
    assert_eq!(s["chunks"], 3);
    let v = video(&dir.join("index.m3u8"));
    assert_eq!(
        (v["codec_name"].as_str(), num(&v, "nb_read_frames")),
        (Some("hevc"), 75.0)
    );
    let tag = ffprobe(
        &dir.join("init.mp4"),
        &[
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_tag_string",
        ],
    );
    assert_eq!(tag["streams"][0]["codec_tag_string"], "hvc1");
    let master = std::fs::read_to_string(out.join("master.m3u8")).unwrap();
    assert!(master.contains("CODECS=\"hvc1.1.6.L"), "{master}");
}
