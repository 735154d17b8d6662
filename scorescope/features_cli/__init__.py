"""``scorescope features``: feature-space locality studies (SCIENCE.md §1 "Feature-space version", §3.4).

    scorescope features profile --model exp1 --sites '*attn2,*resnets*' --t 0.1,0.5,0.9 --out runs/prof --json prof.json
    scorescope features concepts --model colour --out runs/concepts --json concepts.json
    scorescope features sdxl --model PATH_OR_ID --out runs/sdxl            # add --plan for the cost only

One module per command (``profile``, ``concepts``, ``sdxl``); each only parses and checks options, and the
work is done by the matching module of :mod:`scorescope.experiments`.
"""

from __future__ import annotations

import typer

from scorescope.features_cli.concepts import concepts
from scorescope.features_cli.profile import profile
from scorescope.features_cli.sdxl import sdxl

app = typer.Typer(help="Feature-space locality studies: layer profiles, concept geometry, SDXL style + content.\n\n"
                  "Example: scorescope features profile --model exp1 --sites '*attn2' --out runs/profile",
                  no_args_is_help=True, add_completion=False)
app.command("profile")(profile)
app.command("concepts")(concepts)
app.command("sdxl")(sdxl)
