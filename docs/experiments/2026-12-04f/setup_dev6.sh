bash .dev6/base.sh .dev6
if [ -f /tmp/fa4/cu13.part00 ]; then
  cat /tmp/fa4/cu13.part00 .dev6/cu13.part01 > /tmp/fa4/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl && rm /tmp/fa4/cu13.part00
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fa4site /tmp/fa4/*.whl 2>&1 | grep -v WARN
  echo "import site; site.addsitedir('/tmp/fa4site')" >> /tmp/site/sitecustomize.py && echo "fa4 installed"
else
  echo "MACHINE WAS RELEASED: no FA4 this call"
fi
