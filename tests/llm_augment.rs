//! `slot4acir llm-augment` against a scripted chat-completions server on loopback: faults of
//! every kind, the augmented files' layout, a run killed half-way and resumed, failures.

mod common;
mod llm_server;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use llm_server::{good, scripted, Reply, Server, TEMPLATE};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_slot4acir");

/// The first `n` triplets of a real caption file whose captions are all distinct (so that the
/// server's log names each caption's triplet), optionally with some blank-caption ones.
fn real_triplets(file: &str, key: &str, n: usize, blanks: usize) -> Vec<Value> {
    let path = common::shared_dir().join("data").join(file);
    let all: Vec<Value> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let texts = |t: &Value| -> Vec<String> {
        match &t[key] {
            Value::String(s) => vec![s.clone()],
            v => v
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect(),
        }
    };
    let mut seen = HashSet::new();
    let mut out: Vec<Value> = Vec::new();
    for t in &all {
        let c = texts(t);
        if c.iter().any(|c| c.trim().is_empty() || seen.contains(c)) || out.len() >= n {
            continue;
        }
        seen.extend(c);
        out.push(t.clone());
    }
    let blank = all
        .iter()
        .filter(|t| texts(t).iter().any(|c| c.trim().is_empty()));
    out.extend(blank.take(blanks).cloned());
    assert_eq!(out.len(), n + blanks, "{file} has too few usable triplets");
    out
}

/// A data root holding `captions/{name}` and the test prompt template.
fn data_root(dir: &Path, name: &str, triplets: &[Value]) -> PathBuf {
    std::fs::create_dir_all(dir.join("captions")).unwrap();
    std::fs::write(
        dir.join("captions").join(name),
        serde_json::to_vec(triplets).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("prompt.txt"), TEMPLATE).unwrap();
    dir.to_path_buf()
}

fn command(root: &Path, dataset: &str, server: &Server, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["llm-augment", "--dataset", dataset, "--model", "test-model"])
        .arg("--data-root")
        .arg(root)
        .args(["--endpoint", &server.url])
        .arg("--prompt-template")
        .arg(root.join("prompt.txt"))
        .args([
            "--concurrency",
            "3",
            "--timeout",
            "0.8",
            "--retries",
            "4",
            "--reasks",
            "3",
        ])
        .args(["--backoff", "0.01", "--max-backoff", "0.05"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn read_json(path: &Path) -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Records of a progress file: (triplet, slot, caption), complete lines only.
fn finished(progress: &Path) -> Vec<(u64, u64, String)> {
    let text = std::fs::read_to_string(progress).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .skip(1)
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["i"].as_u64().unwrap(),
                v["slot"].as_u64().unwrap(),
                v["caption"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// Requests the fault script costs a caption: its faults, then the good answer.
fn scripted_requests(caption: &str) -> usize {
    (1..)
        .find(|&a| scripted(caption, a) == Reply::Good)
        .unwrap() as usize
}

/// Checks a CIRR output as the training reader uses it: `caption` = [original, paraphrases],
/// every other field as in the input.
fn check_cirr(output: &[Value], input: &[Value], n: usize) {
    assert_eq!(output.len(), input.len());
    for (o, i) in output.iter().zip(input) {
        let original = i["caption"].as_str().unwrap();
        let mut want: Vec<String> = vec![original.to_string()];
        want.extend(good(original, n));
        assert_eq!(o["caption"], serde_json::json!(want));
        let mut rest = o.clone();
        rest["caption"] = i["caption"].clone();
        assert_eq!(&rest, i);
    }
}

#[test]
fn cirr_with_faults_is_complete_and_a_killed_run_resumes_without_repeats() {
    let input = real_triplets("cirr/captions/cap.rc2.val.json", "caption", 60, 0);
    let n = 3;
    let np = n.to_string();
    let args = ["--paraphrases", np.as_str()];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let root_a = data_root(dir_a.path(), "cap.rc2.train.json", &input);
    let root_b = data_root(dir_b.path(), "cap.rc2.train.json", &input);
    let output = |root: &Path| root.join("captions/cap.rc2.llm.train.json");
    let progress = |root: &Path| root.join("captions/cap.rc2.llm.train.json.progress.jsonl");
    let delay = Duration::from_millis(40);
    let slow = Duration::from_millis(1600);

    // Uninterrupted run: every fault recovered, every request accounted for.
    let server = Server::start(delay, slow, None);
    let (out, text) = run(&mut command(&root_a, "cirr", &server, &args));
    assert!(out.status.success(), "{text}");
    check_cirr(&read_json(&output(&root_a)), &input, n);
    let log = server.log();
    let captions: Vec<&str> = input
        .iter()
        .map(|t| t["caption"].as_str().unwrap())
        .collect();
    let want: usize = captions.iter().map(|c| scripted_requests(c)).sum();
    assert_eq!(log.len(), want, "requests beyond the fault script");
    let kinds: HashSet<Reply> = log.iter().map(|(_, r)| *r).collect();
    for kind in [
        Reply::TooMany429,
        Reply::Error503,
        Reply::Malformed,
        Reply::WrongCount,
    ]
    .into_iter()
    .chain([Reply::Preamble, Reply::Slow, Reply::Copy, Reply::Empty])
    {
        assert!(
            kinds.contains(&kind),
            "the test data never triggered {kind:?}"
        );
    }
    let retried = captions.iter().filter(|c| scripted_requests(c) > 1).count();
    let report = format!("0 done before, {retried} retried, 0 failed");
    assert!(
        text.contains(&report) && text.contains(&format!("{want} requests")),
        "{text}"
    );
    println!(
        "uninterrupted: {} captions, {want} requests, {retried} retried",
        input.len()
    );
    for t in read_json(&output(&root_a)).iter().take(3) {
        println!("sample: {}", serde_json::to_string(&t["caption"]).unwrap());
    }

    // Interrupted run: kill once some captions are finished, restart, compare.
    let server = Server::start(delay, slow, None);
    let mut child = command(&root_b, "cirr", &server, &args).spawn().unwrap();
    let start = Instant::now();
    while finished(&progress(&root_b)).len() < 15 {
        assert!(start.elapsed() < Duration::from_secs(30), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before: HashSet<String> = finished(&progress(&root_b))
        .into_iter()
        .map(|(_, _, c)| c)
        .collect();
    assert!(
        done_before.len() < input.len(),
        "the run ended before the kill"
    );
    assert!(
        !output(&root_b).exists(),
        "a killed run must not write the output"
    );
    let first = server.log().len();
    let (out, text) = run(&mut command(&root_b, "cirr", &server, &args));
    assert!(out.status.success(), "{text}");
    let second = server.log()[first..].to_vec();
    let repeated: Vec<&String> = second
        .iter()
        .map(|(c, _)| c)
        .filter(|c| done_before.contains(*c))
        .collect();
    assert!(
        repeated.is_empty(),
        "asked again for finished captions: {repeated:?}"
    );
    let asked: HashSet<&String> = second.iter().map(|(c, _)| c).collect();
    assert_eq!(asked.len(), input.len() - done_before.len());
    assert!(
        text.contains(&format!("{} done before", done_before.len())),
        "{text}"
    );
    assert_eq!(
        std::fs::read(output(&root_b)).unwrap(),
        std::fs::read(output(&root_a)).unwrap()
    );
    println!(
        "interrupted: killed after {} of {} captions finished ({first} requests); resumed run: \
         {} requests for {} captions, 0 for finished ones",
        done_before.len(),
        input.len(),
        second.len(),
        asked.len()
    );
}

#[test]
fn fashioniq_layout_keeps_originals_first_and_blank_captions() {
    let input = real_triplets(
        "fashioniq/captions/cap.toptee.train.json",
        "captions",
        12,
        2,
    );
    let dir = tempfile::tempdir().unwrap();
    let root = data_root(dir.path(), "cap.toptee.train.json", &input);
    let server = Server::start(
        Duration::from_millis(5),
        Duration::from_millis(1600),
        Some("sk-t"),
    );
    let mut cmd = command(&root, "fashioniq", &server, &["--types", "toptee"]);
    let (out, text) = run(cmd
        .args(["--api-key-env", "TEST_LLM_KEY"])
        .env("TEST_LLM_KEY", "sk-t"));
    assert!(out.status.success(), "{text}");
    let written = read_json(&root.join("captions/cap.toptee.llm.train.json"));
    assert_eq!(written.len(), input.len());
    for (o, i) in written.iter().zip(&input) {
        let caps = o["captions"].as_array().unwrap();
        assert_eq!(
            caps.len(),
            6,
            "captions[0:3] and captions[3:] hold 3 variants each"
        );
        for (slot, part) in caps.chunks(3).enumerate() {
            let original = i["captions"][slot].as_str().unwrap();
            let mut want = vec![original.to_string()];
            if original.trim().is_empty() {
                want.extend([original.to_string(), original.to_string()]);
            } else {
                want.extend(good(original, 2));
            }
            assert_eq!(
                part,
                &want[..]
                    .iter()
                    .map(|s| Value::from(s.as_str()))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(
            (&o["candidate"], &o["target"]),
            (&i["candidate"], &i["target"])
        );
    }
    assert!(text.contains("2 blank kept"), "{text}");
    assert!(!root.join("captions/cap.dress.llm.train.json").exists());

    // A missing key stops the run at once instead of failing caption by caption.
    std::fs::remove_file(root.join("captions/cap.toptee.llm.train.json.progress.jsonl")).unwrap();
    let (out, text) = run(&mut command(
        &root,
        "fashioniq",
        &server,
        &["--types", "toptee"],
    ));
    assert!(!out.status.success() && text.contains("HTTP 401"), "{text}");
    let unauthorized = server
        .log()
        .iter()
        .filter(|(_, r)| *r == Reply::Unauthorized)
        .count();
    assert!(
        (1..=3).contains(&unauthorized),
        "{unauthorized} requests after a 401"
    );
    let bad_n = run(&mut command(
        &root,
        "fashioniq",
        &server,
        &["--paraphrases", "3"],
    ))
    .1;
    assert!(bad_n.contains("FashionIQ needs --paraphrases 2"), "{bad_n}");
}

#[test]
fn failed_captions_are_reported_and_only_they_are_asked_again() {
    let input = real_triplets("cirr/captions/cap.rc2.val.json", "caption", 10, 0);
    let dir = tempfile::tempdir().unwrap();
    let root = data_root(dir.path(), "cap.rc2.train.json", &input);
    let output = root.join("captions/cap.rc2.llm.train.json");
    let server = Server::start(Duration::from_millis(2), Duration::from_millis(1600), None);
    let poisoned: Vec<String> = [2, 7]
        .iter()
        .map(|&i| input[i]["caption"].as_str().unwrap().to_string())
        .collect();
    server.set_poisoned(&poisoned);

    let (out, text) = run(&mut command(&root, "cirr", &server, &[]));
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("8 done now, 0 done before,") && text.contains("2 failed"),
        "{text}"
    );
    assert!(
        text.contains("file NOT written") && text.contains("--allow-failed"),
        "{text}"
    );
    assert!(!output.exists());
    let poisoned_requests = server
        .log()
        .iter()
        .filter(|(_, r)| *r == Reply::Poisoned)
        .count();
    assert_eq!(
        poisoned_requests,
        2 * 5,
        "1 request + 4 retries per failed caption"
    );

    // With --allow-failed the file is written, the failed triplets keep their original only.
    let first = server.log().len();
    let (out, text) = run(&mut command(&root, "cirr", &server, &["--allow-failed"]));
    assert!(
        out.status.success() && text.contains("8 done before"),
        "{text}"
    );
    let asked: HashSet<String> = server.log()[first..]
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(asked, poisoned.iter().cloned().collect());
    let written = read_json(&output);
    let c = |i: usize| input[i]["caption"].clone();
    assert_eq!(written[2]["caption"], Value::Array(vec![c(2), c(2), c(2)]));

    // Once the endpoint recovers, a rerun asks for the two failed captions only.
    server.set_poisoned(&[]);
    let first = server.log().len();
    let (out, text) = run(&mut command(&root, "cirr", &server, &[]));
    assert!(out.status.success(), "{text}");
    let asked: HashSet<String> = server.log()[first..]
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(asked, poisoned.iter().cloned().collect());
    check_cirr(&read_json(&output), &input, 2);
}

/// The written files, in the data root the training commands use (`--data-root R`), read back
/// by the training readers with `--llm-sampler`: every paraphrase reaches the triplet.
#[test]
fn augmented_files_are_read_by_the_training_readers() {
    use slot4acir::data::{cirr, fashioniq, LoadOptions, SkipLog, TripletText};
    let server = Server::start(Duration::from_millis(2), Duration::from_millis(1600), None);
    let llm = LoadOptions {
        llm_sampler: true,
        skip_bad: false,
    };
    let log = SkipLog::new(false);

    // CIRR: R/CIRR/cirr/{captions,image_splits}.
    let input = real_triplets("cirr/captions/cap.rc2.val.json", "caption", 8, 0);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cirr_base = root.join("CIRR/cirr");
    data_root(&cirr_base, "cap.rc2.train.json", &input);
    let mut split = serde_json::Map::new();
    for t in &input {
        let mut names = vec![&t["reference"], &t["target_hard"]];
        names.extend(t["img_set"]["members"].as_array().unwrap());
        for n in names {
            let n = n.as_str().unwrap();
            split.insert(n.into(), format!("./train/{n}.png").into());
        }
    }
    std::fs::create_dir_all(cirr_base.join("image_splits")).unwrap();
    std::fs::write(
        cirr_base.join("image_splits/split.rc2.train.json"),
        serde_json::to_vec(&split).unwrap(),
    )
    .unwrap();
    std::fs::write(root.join("prompt.txt"), TEMPLATE).unwrap();
    let (out, text) = run(&mut command(root, "cirr", &server, &["--paraphrases", "2"]));
    assert!(out.status.success(), "{text}");
    let ds = cirr::load(root, cirr::CirrSplit::Train, llm, &log).unwrap();
    assert_eq!(ds.triplets.len(), input.len());
    for (t, i) in ds.triplets.iter().zip(&input) {
        let original = i["caption"].as_str().unwrap();
        let mut want = vec![original.to_string()];
        want.extend(good(original, 2));
        assert_eq!(
            t.text,
            TripletText::Cirr {
                caption: original.to_string(),
                paraphrases: want
            }
        );
        assert_eq!(t.reference, i["reference"].as_str().unwrap());
    }

    // FashionIQ: R/FashionIQ/{captions,image_splits}, one category.
    let input = real_triplets("fashioniq/captions/cap.dress.train.json", "captions", 6, 0);
    let fiq = root.join("FashionIQ");
    data_root(&fiq, "cap.dress.train.json", &input);
    let mut names: Vec<&str> = input
        .iter()
        .flat_map(|t| {
            [
                t["candidate"].as_str().unwrap(),
                t["target"].as_str().unwrap(),
            ]
        })
        .collect();
    names.dedup();
    std::fs::create_dir_all(fiq.join("image_splits")).unwrap();
    std::fs::write(
        fiq.join("image_splits/split.dress.train.json"),
        serde_json::to_vec(&names).unwrap(),
    )
    .unwrap();
    let (out, text) = run(&mut command(
        root,
        "fashioniq",
        &server,
        &["--types", "dress"],
    ));
    assert!(out.status.success(), "{text}");
    let ds = fashioniq::load(root, &["dress"], fashioniq::FiqSplit::Train, llm, &log).unwrap();
    assert_eq!(ds.triplets.len(), input.len());
    for (t, i) in ds.triplets.iter().zip(&input) {
        let TripletText::FashionIq {
            captions,
            variants: Some(variants),
        } = &t.text
        else {
            panic!("no variants read for {t:?}");
        };
        for slot in 0..2 {
            let original = i["captions"][slot].as_str().unwrap();
            assert_eq!(captions[slot], original);
            let mut want = vec![original.to_string()];
            want.extend(good(original, 2));
            assert_eq!(variants[slot], want);
        }
    }
}
