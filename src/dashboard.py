"""Create or update the project's W&B dashboard: leakage, entropy, blending, reward and accuracy, throughput;
runs grouped by their run group (method and dataset), seeds as a mean with a standard-error band.

    python src/dashboard.py --entity E --project demopsd                  # a new saved workspace; prints its URL
    python src/dashboard.py --entity E --project demopsd --url <its URL>  # update that workspace in place

Needs a W&B login for the server wandb is set to (`wandb login`, `wandb login --host <server>`, or WANDB_API_KEY)
and the `wandb-workspaces` package (installed with the project).
"""

import argparse
import sys

from demopsd.report.dashboard import WORKSPACE_NAME, NotLoggedInError, save_workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B user or team the runs are logged under")
    parser.add_argument("--project", default="demopsd", help="W&B project (logger.wandb.project; default demopsd)")
    parser.add_argument("--name", default=WORKSPACE_NAME, help="the workspace's name")
    parser.add_argument("--url", default=None, help="URL of a workspace saved before, to update instead of adding one")
    args = parser.parse_args(argv)
    try:
        url = save_workspace(args.entity, args.project, args.name, args.url)
    except NotLoggedInError as error:
        print(f"dashboard.py: {error}", file=sys.stderr)
        return 2
    print(f"Workspace saved: {url}")
    print(f"Update it later with: python src/dashboard.py --entity {args.entity} --project {args.project} --url '{url}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
