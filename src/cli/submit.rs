//! `slot4acir submit`: the two CIRR test1 submission files of a checkpoint.

use std::path::PathBuf;

use anyhow::Result;

use super::eval::ModelData;
use crate::data::{cirr, SkipLog};
use crate::eval::driver;
use crate::eval::submission::write_cirr_submission;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelData,
    /// Suffix of the file names: `recall_submission_<NAME>.json`, `recall_subset_submission_<NAME>.json`.
    #[arg(long)]
    pub save_name: String,
    /// Folder for the two files.
    #[arg(long, default_value = "submission")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let root = args.model.root()?;
    let log = SkipLog::new(args.model.skip_bad_images);
    let load = args.model.load_options();
    let mut ds = cirr::load(&root, cirr::CirrSplit::Test1, load, &log)?;
    ds.require_in_gallery(&log)?;
    let enc = args.model.encoder()?;
    let answers = driver::cirr_test1(&enc, &ds, &args.model.options(), &log)?;
    log.report("submit");
    let [recall, subset] = write_cirr_submission(&args.out, &args.save_name, &answers)?;
    println!(
        "{} queries answered: {} and {}",
        answers.len(),
        recall.display(),
        subset.display()
    );
    Ok(())
}
