#!/usr/bin/env bash
# Fetches the Apache Kafka broker the tests run (kafka/pom.xml: Kafka 4.4.0 and a log4j
# backend) from Maven Central into KAFKA_LIBS, once: a cache that holds the jars of this
# POM is used as it is, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${KAFKA_LIBS:?KAFKA_LIBS is not set (the Makefile sets it)}"
pom=kafka/pom.xml
stamp="$dir/.pom-sha256"
want=$(sha256sum "$pom" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "kafka: Apache Kafka jars cached in $dir"
  exit 0
fi
command -v java >/dev/null || { echo "kafka: no java: install Java 17 or newer (apt-get install openjdk-17-jre-headless)"; exit 2; }
command -v mvn >/dev/null || { echo "kafka: no mvn: install Maven (apt-get install maven)"; exit 2; }
tmp="$dir.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp" "$tmp.log"' EXIT
# The plugin is pinned: Maven 3.8's default copy-dependencies is far older.
if ! mvn -B -q -f "$pom" org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >"$tmp.log" 2>&1; then
  cat "$tmp.log"
  rm -f "$tmp.log"
  echo "kafka: fetching the jars of $pom from Maven Central failed (is the registry reachable?)"
  exit 1
fi
rm -f "$tmp.log"
test -f "$tmp/kafka_2.13-4.4.0.jar" || { echo "kafka: $pom brought no kafka_2.13-4.4.0.jar"; exit 1; }
echo "$want" > "$tmp/.pom-sha256"
rm -rf "$dir"
mkdir -p "$(dirname "$dir")"
mv "$tmp" "$dir"
trap - EXIT
echo "kafka: Apache Kafka jars fetched into $dir ($(ls "$dir" | wc -l) files)"
