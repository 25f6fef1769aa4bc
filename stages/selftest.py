"""Stage: check every backbone's weights and preprocessing on reference photos before any experiment.

Writes results/selftest.json and reports/selftest.md; exits non-zero if a native check fails.
"""

import sys

from transferlab import cli, files, layout, precision, selftest, weights

RESULTS, REPORT = layout.SELFTEST_RESULTS, layout.SELFTEST_REPORT


def check(name: str) -> dict:
    identity_path = layout.weights_dir(name) / weights.IDENTITY
    identity = files.read_json(identity_path) if identity_path.is_file() else {}
    if not identity or "unavailable" in str(identity.get("status", "")):
        return {"backbone": name, "status": "skipped: weights unavailable"}
    if identity.get("status") == "random":
        return {"backbone": name, "status": "skipped: not pretrained (weights.init: none)"}
    if not identity.get("top_available"):
        return {"backbone": name, "status": "skipped: classifier top not available"}
    return selftest.run(name, layout.weights_dir(name))


def _top5(variant: dict) -> str:
    return ", ".join(f"{t['index']}{' ' + t['name'] if t['name'] else ''} ({t['prob']:.3f})" for t in variant["top5"])


def markdown(results: list[dict], computed: tuple[str, str]) -> str:
    lines = [
        "# Preprocessing self-test",
        "",
        "ImageNet top-5 on scikit-image's reference photos. `native` must contain an expected class;",
        "`rescale` (x / 255) is shown for comparison. P(expected) sums the acceptable classes.",
        f"Computed under precision `{computed[0]}` ({computed[1]}).",
        "",
        "| backbone | photo | variant | top-5 (index name (prob)) | P(expected) | pass |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if result["status"] != "ran":
            lines.append(f"| {result['backbone']} | - | - | {result['status']} | - | - |")
            continue
        for photo, entry in result["photos"].items():
            for variant, v in entry["variants"].items():
                mark = "yes" if v["pass"] else "**NO**"
                lines.append(
                    f"| {result['backbone']} | {photo} | {variant} | {_top5(v)} | {v['expected_prob']:.3f} | {mark} |"
                )
    return "\n".join(lines) + "\n"


def main(params: dict) -> int:
    computed = precision.from_params(params)
    with precision.policy(computed[0]):  # the precision the pipeline's features will be computed in
        results = [check(name) for name in params["extract"]["backbones"]]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(RESULTS, {"backbones": results, "precision": computed[0], "precision_reason": computed[1]})
    REPORT.write_text(markdown(results, computed))
    failed = [r["backbone"] for r in results if r["status"] == "ran" and not r["passed"]]
    if failed:
        print(
            f"self-test failed for {', '.join(failed)}: a native top-5 misses every expected class "
            f"(see {REPORT}); stopping before any experiment runs on a broken conversion or wrong preprocessing",
            file=sys.stderr,
        )
        return 1
    for r in results:
        print(f"{r['backbone']}: {'passed' if r['status'] == 'ran' else r['status']}")
    return 0


if __name__ == "__main__":
    cli.run("selftest", main, __doc__)
