# Keep each job's records beside its log.
for d in $OUT/*/; do [ -f $d/benchmarks.json ] && cp $d/benchmarks.json ${d%/}_records.json; done; ls $OUT
