"""`python -m pyseqk info`: what is built and which backend runs on each device."""
import json
import sys

from . import backends


def main(argv):
    if argv[1:2] != ["info"]:
        print("usage: python -m pyseqk info", file=sys.stderr)
        return 2
    info = backends.info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = json.dumps(value)
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
