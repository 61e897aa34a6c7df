# The base wheels and the photos, where the machine has none yet (a fresh one): bash base.sh DIR
D=$1
if [ ! -f /tmp/site/sitecustomize.py ]; then
  mkdir -p /tmp/images && cp $D/images/* /tmp/images/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl 2>&1 | grep -v WARN
  echo "import site; site.addsitedir('/tmp/site')" > /tmp/site/sitecustomize.py
  echo "base installed from $D"
else
  echo "base already there (warm machine)"
fi
