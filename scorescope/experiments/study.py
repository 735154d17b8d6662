"""What every study command does before its first unit: load its CLEVR model, check ``--json`` and claim ``--out``.

A study folder holds ``parts/`` (one file per finished unit, so a rerun resumes) and a settings file that binds
the folder to the settings that make its parts comparable (:func:`interp.io.check_settings`). Both checks raise
:class:`interp.clevr.evaluate.OptionError` naming the CLI option, so each command turns them into one usage line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interp.clevr.evaluate import OptionError
from interp.io import check_settings, check_writable_file, prepare_output_dir


def check_json_option(json_path: str | Path | None) -> None:
    """Refuse an unwritable ``--json`` file before any work (``None``: no file asked for)."""
    if json_path is None:
        return
    try:
        check_writable_file(json_path, what="--json file")
    except ValueError as err:
        raise OptionError(str(err), "--json") from None


def claim_study_folder(out: str | Path, kind: str, settings: dict[str, Any], fixed: tuple[str, ...], *, settings_file: str,
                       may_change: str, overwrite: bool) -> tuple[Path, Path]:
    """Claim ``out`` for a study of ``kind`` and bind it to ``settings``; return ``(out, out / "parts")``.

    Raises:
        FileExistsError: ``out`` is a user's or another command's folder and ``overwrite`` is off.
        OptionError: (``--out``) the folder holds parts made with other values of the ``fixed`` settings.
    """
    folder = prepare_output_dir(out, kind, overwrite=overwrite)
    parts = folder / "parts"
    parts.mkdir(exist_ok=True)
    try:
        check_settings(folder / settings_file, settings, fixed, may_change=may_change)
    except ValueError as err:
        raise OptionError(str(err), "--out") from None
    return folder, parts


def load_clevr_model(model: str, *, needs: str, device: str = "cpu", **kwargs: Any) -> Any:
    """:func:`interp.models.registry.load_model` for a command that needs a CLEVR model (located conditioners).

    ``needs`` names the command in the error (``"the feature profile"``); ``kwargs`` go to ``load_model``.

    Raises:
        OptionError: (``--model``) an unknown name or folder, or a model of another family.
    """
    from interp.models.registry import load_model

    try:
        loaded = load_model(model, device=device, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise OptionError(str(err), "--model") from None
    if loaded.family != "clevr":
        raise OptionError(f"{needs} needs a CLEVR model (located conditioners), got {model!r} ({loaded.family}); "
                          "try --model exp1", "--model")
    return loaded
