#!/usr/bin/env bash
# Make a private CA and a SuperLink certificate signed by it, for Flower's TLS.
#
#   scripts/make-certs.sh <out-dir> [host-or-ip ...]      (default hosts: 127.0.0.1 localhost)
#
# Writes ca.crt / ca.key (keep ca.key offline) and server.pem / server.key for the SuperLink
# (--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key). SuperNodes and the
# flwr CLI only need ca.crt (--root-certificates / root-certificates = "..."). Every name or
# address clients use to reach the SuperLink must be listed: it goes into subjectAltName.
set -euo pipefail
out=${1:?usage: make-certs.sh <out-dir> [host-or-ip ...]}
shift
hosts=("$@")
[ ${#hosts[@]} -eq 0 ] && hosts=(127.0.0.1 localhost)
mkdir -p "$out"
cd "$out"

san=""
for host in "${hosts[@]}"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
san=${san%,}

openssl genrsa -out ca.key 4096 2>/dev/null
openssl req -x509 -new -nodes -key ca.key -sha256 -days 365 -subj "/CN=FedSubspace CA" -out ca.crt
openssl genrsa -out server.key 4096 2>/dev/null
openssl req -new -key server.key -subj "/CN=${hosts[0]}" -out server.csr
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -sha256 \
  -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "certificates for ${hosts[*]} in $PWD: ca.crt server.pem server.key (ca.key: keep it safe)"
