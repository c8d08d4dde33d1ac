"""``python -m blindnet.data.synthetic --out DIR``: measure how far each style and lighting moves from A-noon."""

from blindnet.data.synthetic.style import main

if __name__ == "__main__":
    raise SystemExit(main())
