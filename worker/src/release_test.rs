//! `tessera test-release`: what the chart's `helm test` runs. The release's default pool must be Ready under
//! a leading operator; with a location, a 2-second clip made here goes through a TranscodeJob to Succeeded,
//! and the job and every object it wrote are removed afterwards (also when it failed).

use std::path::Path;
use std::time::{Duration, Instant};

use ffmpeg_next as ff;
use kube::api::{Api, DeleteParams, PostParams};
use tessera_crds::{Phase, TranscodeJob, WorkerPool};
use tessera_engine::s3::{self, S3Uri};

pub struct Options {
    /// `namespace/name` of the pool to check and run on.
    pub pool: String,
    /// Where the job runs (a namespace the pool serves).
    pub namespace: String,
    /// `s3://bucket/prefix/` for the clip and the outputs; none: the cluster side only.
    pub location: Option<String>,
    pub timeout: Duration,
}

/// Run the test; the error says which step failed and why.
pub fn run(o: &Options) -> Result<(), String> {
    // The S3 client is made (on its own runtime) before anything runs on that runtime.
    let s3 = o.location.as_ref().map(|_| s3::global());
    s3::block_on(run_async(o, s3))
}

async fn run_async(o: &Options, s3: Option<std::sync::Arc<s3::S3>>) -> Result<(), String> {
    let deadline = Instant::now() + o.timeout;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("connect to the Kubernetes API: {e}"))?;
    let (pns, pname) = o
        .pool
        .split_once('/')
        .ok_or_else(|| format!("--pool {}: namespace/name expected", o.pool))?;
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), pns);
    loop {
        let pool = pools
            .get_opt(pname)
            .await
            .map_err(|e| format!("read WorkerPool {}: {e}", o.pool))?
            .ok_or_else(|| format!("WorkerPool {} does not exist", o.pool))?;
        let ready = pool
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status == "True", c.message.clone()));
        match ready {
            Some((true, _)) => break,
            other if Instant::now() > deadline => {
                return Err(format!(
                "WorkerPool {} is not Ready after {} s (is the operator running and leading?): {}",
                o.pool,
                o.timeout.as_secs(),
                other.map(|(_, m)| m).unwrap_or_else(|| "no status".into())
            ))
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    println!("ok: WorkerPool {} is Ready", o.pool);
    let Some(location) = &o.location else {
        println!(
            "skipped: the job (set tests.location to an S3 prefix the pool can write to run one)"
        );
        return Ok(());
    };
    let base = S3Uri::parse(location)
        .ok_or_else(|| format!("tests.location {location}: an s3://bucket/prefix/ URI expected"))?;
    let name = format!("tessera-test-{:08x}", fastrand::u32(..));
    let dir = base.join(&format!("{name}/"));
    let s3 = s3.expect("made for a location");
    let result = run_job(&client, o, &s3, &name, &dir, deadline).await;
    // Whatever happened: the job goes, then everything under the test's own prefix.
    let jobs: Api<TranscodeJob> = Api::namespaced(client.clone(), &o.namespace);
    let _ = jobs.delete(&name, &DeleteParams::default()).await;
    while jobs.get_opt(&name).await.ok().flatten().is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match s3.delete_prefix(&dir).await {
        Ok(n) => println!("cleaned: {n} objects under {dir}"),
        Err(e) => eprintln!("warning: could not remove {dir}: {e}"),
    }
    result
}

async fn run_job(
    client: &kube::Client,
    o: &Options,
    s3: &std::sync::Arc<s3::S3>,
    name: &str,
    dir: &S3Uri,
    deadline: Instant,
) -> Result<(), String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("a scratch folder (TMPDIR): {e}"))?;
    let clip = tmp.path().join("clip.mp4");
    sample_clip(&clip).map_err(|e| format!("make the test clip: {e}"))?;
    let input = dir.join("input.mp4");
    let bytes = std::fs::read(&clip).map_err(|e| format!("read {}: {e}", clip.display()))?;
    s3.put_small(&input, bytes.into())
        .await
        .map_err(|e| format!("upload the test clip to {input}: {e}"))?;
    println!("ok: uploaded a 2-second clip to {input}");
    let job: TranscodeJob = serde_yaml::from_str(&format!(
        "apiVersion: tessera.dev/v1alpha1\nkind: TranscodeJob\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         labels: {{app.kubernetes.io/name: tessera-helm-test}}\nspec:\n  pool: {pool}\n  input: {{uri: \"{input}\"}}\n  \
         output: {{uri: \"{out}\", container: mp4}}\n  renditions:\n    - name: 120p\n      \
         video: {{codec: h264, height: 120, crf: 30, preset: veryfast}}\n  chunking: {{targetSeconds: 1}}\n  hardware: software\n",
        ns = o.namespace,
        pool = o.pool,
        out = dir.join("out/"),
    ))
    .map_err(|e| format!("the test job: {e}"))?;
    let jobs: Api<TranscodeJob> = Api::namespaced(client.clone(), &o.namespace);
    jobs.create(&PostParams::default(), &job)
        .await
        .map_err(|e| format!("create TranscodeJob {}/{name}: {e}", o.namespace))?;
    println!("ok: created TranscodeJob {}/{name}", o.namespace);
    let mut last = String::new();
    loop {
        let j = jobs
            .get(name)
            .await
            .map_err(|e| format!("read TranscodeJob {}/{name}: {e}", o.namespace))?;
        let st = j.status.unwrap_or_default();
        let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
        let now = format!(
            "{:?} {}",
            st.phase.unwrap_or_default(),
            st.progress
                .as_ref()
                .map(|p| p.display.as_str())
                .unwrap_or("")
        );
        if now != last {
            println!("job: {now}");
            last = now;
        }
        match st.phase {
            Some(Phase::Succeeded) => {
                println!("ok: TranscodeJob {}/{name} Succeeded", o.namespace);
                return Ok(());
            }
            Some(Phase::Failed) => {
                return Err(format!(
                    "TranscodeJob {}/{name} Failed: {}",
                    o.namespace,
                    ready.map(|c| c.message.as_str()).unwrap_or("no message")
                ))
            }
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "TranscodeJob {}/{name} did not finish in {} s ({last}): {}",
                    o.namespace,
                    o.timeout.as_secs(),
                    ready
                        .map(|c| c.message.as_str())
                        .unwrap_or("no Ready condition")
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// A 2-second 320x240 25 fps H.264 MP4 (a moving gradient, a keyframe every second) at `path`.
pub fn sample_clip(path: &Path) -> Result<(), String> {
    use ff::format::Pixel;
    tessera_engine::avlog::init();
    let e = |what: &'static str| move |err: ff::Error| format!("{what}: {err}");
    let (w, h, fps) = (320u32, 240u32, 25i32);
    let mut octx = ff::format::output_as(path, "mp4").map_err(e("open the MP4 muxer"))?;
    let codec = ff::encoder::find_by_name("libx264").ok_or("libx264 is not built in")?;
    let mut enc = ff::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()
        .map_err(e("an H.264 encoder"))?;
    enc.set_width(w);
    enc.set_height(h);
    enc.set_format(Pixel::YUV420P);
    enc.set_time_base((1, fps));
    enc.set_frame_rate(Some((fps, 1)));
    enc.set_gop(fps as u32);
    if octx
        .format()
        .flags()
        .contains(ff::format::Flags::GLOBAL_HEADER)
    {
        enc.set_flags(ff::codec::Flags::GLOBAL_HEADER);
    }
    let mut opts = ff::Dictionary::new();
    opts.set("preset", "ultrafast");
    let mut enc = enc.open_with(opts).map_err(e("open libx264"))?;
    let mut st = octx.add_stream(codec).map_err(e("add the video stream"))?;
    st.set_parameters(&enc);
    st.set_time_base((1, fps));
    octx.write_header().map_err(e("write the MP4 header"))?;
    let st_tb = octx.stream(0).ok_or("no stream")?.time_base();
    let drain = |enc: &mut ff::encoder::Video, octx: &mut ff::format::context::Output| {
        let mut pkt = ff::Packet::empty();
        while enc.receive_packet(&mut pkt).is_ok() {
            pkt.set_stream(0);
            pkt.rescale_ts((1, fps), st_tb);
            pkt.write_interleaved(octx).map_err(e("write a packet"))?;
        }
        Ok::<(), String>(())
    };
    for i in 0..(2 * fps) {
        let mut f = ff::frame::Video::new(Pixel::YUV420P, w, h);
        for plane in 0..3 {
            let stride = f.stride(plane);
            let (pw, ph) = if plane == 0 { (w, h) } else { (w / 2, h / 2) };
            let data = f.data_mut(plane);
            for y in 0..ph as usize {
                for x in 0..pw as usize {
                    data[y * stride + x] = if plane == 0 {
                        ((x + y + 4 * i as usize) % 256) as u8
                    } else {
                        128
                    };
                }
            }
        }
        f.set_pts(Some(i64::from(i)));
        enc.send_frame(&f).map_err(e("encode a frame"))?;
        drain(&mut enc, &mut octx)?;
    }
    enc.send_eof().map_err(e("flush the encoder"))?;
    drain(&mut enc, &mut octx)?;
    octx.write_trailer().map_err(e("finish the MP4"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_clip_is_two_seconds_with_a_keyframe_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("clip.mp4");
        super::sample_clip(&p).unwrap();
        let info = tessera_engine::probe::probe(&p).unwrap();
        assert_eq!(info.video.frames, 50);
        assert_eq!((info.video.width, info.video.height), (320, 240));
        assert_eq!(info.keyframes.len(), 2, "{:?}", info.keyframes);
    }
}
