bash .dev5/base.sh .dev5
mkdir -p /tmp/fa4 && cp .dev5/fa4/* /tmp/fa4/ && echo "fa4 part 1 staged"
