#!/usr/bin/env bash
# Builds the small VM the LVM provider's test boots (agent/tests/lvm_vm.rs): Debian's kernel and
# the device-mapper modules it needs, and an initramfs with static busybox, lvm2, dmsetup and
# thin-provisioning-tools (thin_check, thin_delta, thin_dump, thin_ls) with their shared libraries. Everything comes from Debian packages: the kernel is fetched with
# apt-get download here, so nothing downloads at test time. Cached: when the image exists and
# its inputs (this script, the package versions) did not change, it does nothing.
#
# Usage: tests/vm/build-image.sh [OUT_DIR]   (default $STILLPOINT_VM_DIR or ~/.cache/stillpoint/vm)
# Needs: busybox-static, lvm2, dmsetup, thin-provisioning-tools installed (for their binaries), apt-get.
set -euo pipefail

out=${1:-${STILLPOINT_VM_DIR:-$HOME/.cache/stillpoint/vm}}
here=$(cd "$(dirname "$0")" && pwd)

for tool in /bin/busybox /sbin/lvm /sbin/dmsetup /usr/sbin/pdata_tools; do
  [ -x "$tool" ] || { echo "build-image: $tool is missing: apt-get install busybox-static lvm2 dmsetup thin-provisioning-tools" >&2; exit 1; }
done
busybox=$(command -v busybox)
file "$busybox" 2>/dev/null | grep -q 'statically linked' || ldd "$busybox" 2>&1 | grep -q 'not a dynamic' || {
  echo "build-image: $busybox is not static: apt-get install busybox-static" >&2; exit 1; }

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build-image: apt-cache knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
versions=$(dpkg-query -W -f '${Package}=${Version}\n' busybox-static lvm2 dmsetup thin-provisioning-tools libc6)
stamp=$( (cat "$0" "$here/lvm.conf" "$here/init"; echo "$kpkg=$kver"; echo "$versions") | sha256sum | cut -d' ' -f1)

if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ]; then
  echo "build-image: $out is up to date ($kpkg $kver)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build-image: fetching $kpkg $kver"
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1 || apt-get download "$kpkg")
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/k"
moddir=$(echo "$work"/k/lib/modules/*)
release=$(basename "$moddir")

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/sbin,etc/lvm,proc,sys,dev,run/lock/lvm,tmp,lib/modules,test}

# Modules: the roots and what each depends on (.modinfo's depends=), loaded deps first.
declare -A path_of=()
while IFS= read -r ko; do
  name=$(basename "$ko" .ko)
  path_of[$name]=$ko
  path_of[${name//-/_}]=$ko
done < <(find "$moddir/kernel" -name '*.ko')
order=()
declare -A seen=()
add() {
  local name=${1//-/_} ko deps d
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  ko=${path_of[$name]:-}
  [ -n "$ko" ] || { echo "build-image: module $1 not in $release" >&2; exit 1; }
  deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do add "$d"; done
  order+=("$name")
  cp "$ko" "$root/lib/modules/$name.ko"
}
for m in crc32c_generic virtio virtio_ring virtio_pci virtio_blk dm-mod dm-bufio dm-bio-prison \
         dm-persistent-data dm-snapshot dm-thin-pool; do
  add "$m"
done
printf '%s\n' "${order[@]}" >"$root/lib/modules/order"

# Programs and the libraries they load.
cp "$busybox" "$root/bin/busybox"
cp /sbin/lvm "$root/sbin/lvm"
for cmd in pvcreate vgcreate vgs lvs lvcreate lvremove lvchange lvextend; do ln -s lvm "$root/sbin/$cmd"; done
# dmsetup sends the pool its messages (reserve_metadata_snap); thin_delta compares two thin
# devices' mappings (the LVM thin change map).
cp /sbin/dmsetup "$root/sbin/dmsetup"
cp /usr/sbin/pdata_tools "$root/usr/sbin/pdata_tools"
for t in thin_check thin_delta thin_dump thin_ls; do ln -s pdata_tools "$root/usr/sbin/$t"; done
for lib in $(ldd /sbin/lvm /sbin/dmsetup /usr/sbin/pdata_tools | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(/ {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
mkdir -p "$root/lib64"
[ -e "$root/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"

cp "$here/lvm.conf" "$root/etc/lvm/lvm.conf"
cp "$here/init" "$root/init"
chmod +x "$root/init"

(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initramfs.cpio.gz")
mkdir -p "$out"
cp "$work"/k/boot/vmlinuz-* "$out/vmlinuz.new" && mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$work/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$release" >"$out/release"
echo "$stamp" >"$out/stamp"
echo "build-image: $out ready: kernel $release, modules ${order[*]}, initramfs $(du -h "$out/initramfs.cpio.gz" | cut -f1)"
