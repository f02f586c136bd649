//! The web page in headless Chromium: a query given in the link runs, its results appear in
//! the DOM as thumbnails of gallery images, and the screenshot shows them.
//! Needs Debian's chromium (`scripts/install-chromium.sh`, run by `scripts/test.sh`).

mod gallery;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slot4acir::index::build::list_image_dir;
use slot4acir::index::format::Dtype;
use slot4acir::index::{build_index, BuildOptions, Index, Searcher, ToyEncoder};
use slot4acir::serve::{App, BatchOptions, Limits, Server};

fn chromium() -> PathBuf {
    for c in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(c).exists() {
            return PathBuf::from(c);
        }
    }
    panic!("headless Chromium not found: run scripts/install-chromium.sh (scripts/test.sh does)");
}

/// Runs Chromium headless on `url` with extra arguments; returns stdout.
fn run_chromium(profile: &Path, url: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1100,900",
        "--virtual-time-budget=15000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("starting chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pixels that are clearly coloured (the synthetic gallery is; the page chrome is grey).
fn colourful_pixels(png: &Path) -> usize {
    let img = image::open(png).expect("reading the screenshot").to_rgb8();
    img.pixels()
        .filter(|p| {
            let (mx, mn) = (p.0.iter().max().unwrap(), p.0.iter().min().unwrap());
            mx - mn > 60
        })
        .count()
}

#[test]
fn web_page_shows_result_thumbnails_for_a_query() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = gallery::write_gallery(tmp.path(), 8);
    let images = list_image_dir(&dir).unwrap();
    let enc = Arc::new(ToyEncoder::new(4, 12, gallery::LAYOUT).unwrap());
    let out = tmp.path().join("g.s4idx");
    let opts = BuildOptions {
        dtype: Dtype::F16,
        batch_size: 4,
        progress: false,
    };
    build_index(enc.as_ref(), &images, &dir, &out, &opts).unwrap();
    let searcher = Searcher::new(Index::open(&out).unwrap(), enc).unwrap();
    let app = App::new(searcher, None, Limits::default(), &BatchOptions::default()).unwrap();
    let server = Server::start(app, "127.0.0.1:0").unwrap();

    let base = format!("http://{}/", server.addr);
    let reference = &images[1].name;
    let query = format!("{base}?reference={reference}&text=make%20it%20red&k=4");

    let dom = run_chromium(&tmp.path().join("profile-dom"), &query, &["--dump-dom"]);
    assert!(
        dom.contains("data-state=\"done\""),
        "the query did not finish:\n{dom}"
    );
    let figures = dom.matches("<figure class=\"result\">").count();
    assert_eq!(figures, 4, "expected 4 result thumbnails:\n{dom}");
    assert_eq!(
        dom.matches("<img src=\"/images/").count(),
        8 + 4,
        "picker + results:\n{dom}"
    );
    assert!(dom.contains("4 results"));

    // The screenshot: results add thumbnails to what the page shows without a query.
    let shot = |name: &str, url: &str| {
        let png = tmp.path().join(name);
        run_chromium(
            &tmp.path().join(format!("profile-{name}")),
            url,
            &[&format!("--screenshot={}", png.display())],
        );
        assert!(png.exists(), "no screenshot at {}", png.display());
        png
    };
    let without = colourful_pixels(&shot("idle.png", &base));
    let with = colourful_pixels(&shot("query.png", &query));
    // Four 150×150 thumbnails of colourful images: well over one thumbnail's worth each.
    assert!(
        with > without + 4 * 150 * 150 / 2,
        "result thumbnails not visible: {with} colourful pixels with the query, {without} without"
    );
    std::fs::copy(
        tmp.path().join("query.png"),
        std::env::temp_dir().join("slot4acir-page.png"),
    )
    .ok();
}
