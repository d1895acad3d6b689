"""`resnet-lit models | blocks | describe`: the zoo's inspection commands."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from resnet_lit.cli import main


def table_rows(text: str) -> dict[str, str]:
    """First word of each line -> the rest of the line."""
    rows = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=1)
        if parts:
            rows[parts[0]] = parts[1] if len(parts) > 1 else ""
    return rows


def test_describe_resnet50(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "resnet50"])
    out = capsys.readouterr().out
    assert out.startswith("resnet50 @ 3x224x224")
    rows = table_rows(out)
    for name in ("stem", "stage1", "stage2", "stage3", "stage4", "head", "total"):
        assert name in rows, f"no {name!r} row in:\n{out}"
    assert "stage5" not in rows
    assert rows["stem"].split()[:5] == ["64", "x", "56", "x", "56"]
    assert rows["stage4"].split()[:5] == ["2048", "x", "7", "x", "7"]
    assert rows["head"].split()[0] == "1000"
    assert "25,557,032" in rows["total"]
    assert re.search(r"params: 25\.56 M\s+MACs: 4\.1 G$", out.strip())
    macs = {name: rows[name].split()[-1] for name in ("stem", "stage1", "stage2", "stage3", "stage4", "head", "total")}
    assert macs == {"stem": "118,013,952", "stage1": "667,942,912", "stage2": "1,027,604,480",
                    "stage3": "1,464,336,384", "stage4": "809,238,528", "head": "2,048,000",
                    "total": "4,089,184,256"}  # fmt: skip


def test_describe_cifar_net_at_32(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "resnet20", "--image-size", "32"])
    out = capsys.readouterr().out
    assert out.startswith("resnet20 @ 3x32x32")
    rows = table_rows(out)
    assert "stage4" not in rows
    assert rows["stage3"].split()[:5] == ["64", "x", "8", "x", "8"]
    assert rows["head"].split()[0] == "10"
    assert "269,722" in rows["total"]
    assert "params: 0.27 M" in out


def test_describe_defaults_to_32_for_a_cifar_stem(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "resnet20"])
    assert capsys.readouterr().out.startswith("resnet20 @ 3x32x32")


def test_describe_with_in_channels(capsys: pytest.CaptureFixture[str]) -> None:
    main(["describe", "resnet18", "--in-channels", "1", "--image-size", "64"])
    out = capsys.readouterr().out
    assert out.startswith("resnet18 @ 1x64x64")
    rows = table_rows(out)
    # A 1-channel 7x7 stem conv (49 * 64) plus its BatchNorm (2 * 64).
    assert rows["stem"].split()[:6] == ["64", "x", "16", "x", "16", f"{49 * 64 + 2 * 64:,}"]
    assert rows["stage4"].split()[:5] == ["512", "x", "2", "x", "2"]


@pytest.mark.parametrize("typo", ["resnt50", "resnet5"])
def test_describe_unknown_model_suggests_close_match(typo: str) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["describe", typo])
    message = str(excinfo.value.code)
    assert excinfo.value.code not in (0, None)
    assert f"Unknown model '{typo}'" in message
    assert re.search(r"Did you mean: [^?]*\bresnet50\b", message)


@pytest.mark.parametrize("flag", ["--in-channels", "--image-size"])
def test_describe_with_unfitting_sizes_is_an_error_not_a_crash(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["describe", "resnet18", flag, "0"])
    assert excinfo.value.code not in (0, None)
    assert f"{flag}: must be a positive integer" in capsys.readouterr().err


def test_models_without_match_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["models", "nomatch*"])
    assert excinfo.value.code == 1
    assert "no models match 'nomatch*'" in capsys.readouterr().err


def test_models_wildcard(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models", "wide*"])
    assert capsys.readouterr().out == "wide_resnet101_2\nwide_resnet50_2\n"


def test_models_lists_everything_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models"])
    names = capsys.readouterr().out.split()
    assert names == sorted(names)
    assert {"resnet18", "resnet50", "resnet20", "resnet110", "seresnet50", "resnext50_32x4d"} <= set(names)


def test_blocks_lists_builtins_with_origin(capsys: pytest.CaptureFixture[str]) -> None:
    main(["blocks"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    for name, cls in [("basic", "BasicBlock"), ("bottleneck", "Bottleneck"), ("se_basic", "SEBasicBlock"),
                      ("se_bottleneck", "SEBottleneck")]:  # fmt: skip
        assert rows[name] == ["built-in", f"resnet_lit.models.blocks.{cls}"]


def test_describe_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lit", "describe", "resnet20", "--image-size", "32"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("resnet20 @ 3x32x32")
    assert "269,722" in table_rows(result.stdout)["total"]


def test_describe_unknown_model_in_a_subprocess_exits_non_zero() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lit", "describe", "nosuchmodel"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Unknown model 'nosuchmodel'" in result.stderr
    assert "Valid choices: " in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
