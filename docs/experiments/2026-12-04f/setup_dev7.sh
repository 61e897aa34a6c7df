bash .dev7/base.sh .dev7
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/avsite .dev7/av-*.whl 2>&1 | grep -v WARN
echo "import site; site.addsitedir('/tmp/avsite')" >> /tmp/site/sitecustomize.py && echo "av installed"
