"""python -m reporting OUT [--note TEXT]: results.md/results.json and figs/ of a demo directory."""
import argparse
import json
import os

from core.cli import run
from core.errors import BidfError

from . import figures, results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="tables and pictures of a demo run directory")
    p.add_argument("out", help="the demo's run directory (scriptskd/demo.sh prints it)")
    p.add_argument("--note", default="", help="a line appended under the table")
    a = p.parse_args(argv)
    if not os.path.isdir(a.out):
        raise BidfError(f"{a.out} is not a directory; pass the directory scriptskd/demo.sh printed")
    res = results.write(a.out, a.note)
    figs = os.path.join(a.out, "figs")
    os.makedirs(figs, exist_ok=True)
    rand = next((r for r in res["rows"] if r["method"] == "random_init" and r["shot"] == 1), None)
    runs = {m: os.path.join(a.out, m) for m in ("bidf_mkd", "maml_real") if os.path.isdir(os.path.join(a.out, m))}
    figures.accuracy_curves(runs, os.path.join(figs, "accuracy.png"),
                            baseline=(rand["acc"], rand["ci"]) if rand else None,
                            title="5-way 1-shot meta-test accuracy (100 fixed tasks per point)")
    if "bidf_mkd" in runs:
        figures.recovered_vs_real(runs["bidf_mkd"], os.path.join(figs, "recovered_vs_real.png"))
    print(results.markdown(res, a.note))
    print(json.dumps({"results": os.path.join(a.out, "results.md"), "figs": sorted(os.listdir(figs))}))


if __name__ == "__main__":
    run(main)
