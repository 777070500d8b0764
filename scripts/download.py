"""Download StepSearch's released data (HF `Zill1/StepSearch-musi-dataset`: train/dev JSONL, `musi.jsonl`
corpus, `musi.index`) and optionally Search-R1's wiki-18 corpus and e5 index (parts joined).

    python scripts/download.py --save_path data/musi                           # StepSearch data only
    python scripts/download.py --save_path data/wiki18 --only wiki18_corpus wiki18_index

Shows progress, resumes partial downloads and verifies sizes (and LFS sha256). Offline, or with
HF_HUB_OFFLINE=1, it stops at once and prints what to download by hand and where to put it.
"""
import argparse
import sys

from stepsearch.data.download import BUNDLES, OfflineError, download


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save_path", required=True)
    ap.add_argument("--wiki18", action="store_true", help="also fetch the wiki-18 corpus and e5 index (~70 GB)")
    ap.add_argument("--only", nargs="+", choices=sorted(BUNDLES), help="fetch exactly these bundles")
    a = ap.parse_args(argv)
    bundles = a.only or (["stepsearch"] + (["wiki18_corpus", "wiki18_index"] if a.wiki18 else []))
    try:
        paths = download(a.save_path, bundles)
    except (OfflineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(["downloaded and verified:"] + [f"  {p}" for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
