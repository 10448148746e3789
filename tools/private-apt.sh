# Sourced by the fetch scripts: apt on a private source list, package lists and cache under
# one directory, with the system's bookworm mirror for bookworm and bookworm-backports, so the
# system's apt configuration is never changed. Packages are downloaded, never installed.
#
#   private_apt DIR    ->  APT_OPTS (an array of apt-get/apt-cache options), lists updated

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

private_apt() {
    local dir=$1 mirror
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' |
             awk '$2 == "bookworm" { print $1; exit }')
    mirror=${DEBIAN_MIRROR:-$mirror}
    if [ -z "$mirror" ]; then
        echo "no bookworm source in the system's apt configuration: set DEBIAN_MIRROR" >&2
        return 1
    fi
    [ -r "$KEYRING" ] || { echo "$KEYRING missing (apt-get install debian-archive-keyring)" >&2; return 1; }
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$mirror" bookworm "$KEYRING" "$mirror" bookworm-backports \
        > "$dir/sources.list"
    APT_OPTS=(-q -o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o APT::Sandbox::User=root)
    apt-get "${APT_OPTS[@]}" update
}
