//! The fuzz corpus (`fuzz/corpus/<target>/`, grown by `make fuzz` with cargo fuzz) replayed through the same
//! entry points the fuzz targets call, plus seeded mutations of every entry (bit flips, truncations,
//! splices, repeated runs), on the stable toolchain: a crash once found stays fixed, and the entry points
//! get a quick shake in every `make test`.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("corpus entry"),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus for {target}");
    out
}

fn mutate(data: &[u8], other: &[u8], rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..rng.usize(1..4) {
        match rng.u8(0..5) {
            0 if !d.is_empty() => {
                let i = rng.usize(..d.len());
                d[i] ^= 1 << rng.u8(0..8);
            }
            1 if !d.is_empty() => {
                let i = rng.usize(..d.len());
                d[i] = [0, 0xff, 0x7f, 0x80][rng.usize(..4)];
            }
            2 => d.truncate(rng.usize(..=d.len())),
            3 if !other.is_empty() => {
                let (a, b) = (rng.usize(..other.len()), rng.usize(..other.len()));
                let at = rng.usize(..=d.len());
                d.splice(at..at, other[a.min(b)..a.max(b)].iter().copied());
            }
            _ if !d.is_empty() => {
                let (a, b) = (rng.usize(..d.len()), rng.usize(..d.len()));
                let run = d[a.min(b)..a.max(b)].to_vec();
                let at = rng.usize(..=d.len());
                d.splice(at..at, run);
            }
            _ => d.push(rng.u8(..)),
        }
    }
    d
}

fn replay(target: &str, mutations_per_entry: usize, f: fn(&[u8])) {
    let entries = corpus(target);
    let mut rng = fastrand::Rng::with_seed(0x7e55e4a);
    for (name, data) in &entries {
        f(data);
        for m in 0..mutations_per_entry {
            let other = &entries[rng.usize(..entries.len())].1;
            let input = mutate(data, other, &mut rng);
            if std::env::var_os("TESSERA_FUZZ_TRACE").is_some() {
                eprintln!("{target}: {name} mutation {m}: {} bytes", input.len());
                let _ = std::fs::write(std::env::temp_dir().join("tessera-fuzz-last"), &input);
            }
            let r = std::panic::catch_unwind(|| f(&input));
            assert!(
                r.is_ok(),
                "{target}: mutation {m} of {name} panicked; input (hex) {}",
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
    }
}

#[test]
fn probe_and_plan_corpus() {
    tessera_engine::avlog::init();
    // The seeds are real media: the probe must read them, or the mutations test nothing.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/probe");
    for f in ["tiny.mp4", "tiny.mkv", "tiny.ts"] {
        let info =
            tessera_engine::probe::probe(&dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            info.keyframes.len() >= 2,
            "{f}: keyframes {:?}",
            info.keyframes
        );
    }
    replay("probe", 40, tessera_engine::fuzzing::probe_and_plan);
}

#[test]
fn planner_corpus() {
    replay("plan", 500, tessera_engine::fuzzing::plan);
}

#[test]
fn queue_messages_corpus() {
    replay(
        "queue_messages",
        500,
        tessera_operator::fuzzing::queue_messages,
    );
}

#[test]
fn job_spec_corpus() {
    replay("job_spec", 300, tessera_operator::fuzzing::job_spec);
}
