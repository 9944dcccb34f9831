"""CLI: the ``model`` group — inspect the U-Net that ``cellseg train`` builds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

model_app = typer.Typer(help="The U-Net: inspect its stages and size.", no_args_is_help=True)


@model_app.command("summary")
def summary(
    in_channels: Annotated[int, typer.Option("--in-channels", help="Input channels (one per loading code).")] = 3,
    classes: Annotated[int, typer.Option("--classes", help="Output classes.")] = 2,
    size: Annotated[int, typer.Option("--size", help="Square input side in pixels (any size, e.g. 400).")] = 400,
    encoder: Annotated[str, typer.Option("--encoder", help="timm encoder name (features_only).")] = "resnet34",
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Encoder weights: a timm pretrained tag (imagenet = timm's default, or e.g. a1_in1k; from timm's"
            " cache or the model hub) or a local weights file or folder. Default: random.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {parameters, output_shape, stages} as JSON.")] = False,
) -> None:
    """Build the model and print each stage's output shape and the parameter count.

    Example: `cellseg model summary --in-channels 3 --classes 2 --size 400 --json`
    """
    from cellseg.errors import ConfigError
    from cellseg.model import build_model
    from cellseg.model.summary import summarize

    if size < 32:
        raise ConfigError(f"--size {size}: the encoder needs at least 32 pixels")
    report = summarize(build_model(encoder, in_channels, classes, encoder_weights=weights), size)
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{'stage':<12}{'output shape':<24}{'parameters':>14}")
    for stage in report["stages"]:
        params = "" if stage["parameters"] is None else f"{stage['parameters']:,}"
        shape = " x ".join(str(d) for d in stage["shape"])
        typer.echo(f"{stage['stage']:<12}{shape:<24}{params:>14}")
    typer.echo(f"{encoder}: {report['parameters']:,} parameters, output {report['output_shape']}")


def register(app: typer.Typer) -> None:
    """Attach ``cellseg model ...`` to the root app."""
    app.add_typer(model_app, name="model")
