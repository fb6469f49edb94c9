package azurefake

import (
	"context"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"time"
)

// Version is a redis-server version. Azure Cache for Redis runs 6.0, which lacks what 6.2 added
// (RESET, LMOVE/BLMOVE, GETDEL/GETEX, CLIENT INFO, COPY, the ACL channel selector &*...): tests
// that need such a command pick the version's equivalent with AtLeast.
type Version struct{ Major, Minor, Patch int }

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || v.Major == major && v.Minor >= minor
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// versionLimit bounds `redis-server --version`, which answers at once.
const versionLimit = 10 * time.Second

var versionRE = regexp.MustCompile(`\bv=(\d+)\.(\d+)\.(\d+)\b`)

// parseVersion reads the output of `redis-server --version`:
// "Redis server v=6.0.20 sha=00000000:0 malloc=libc bits=64 build=...".
func parseVersion(out string) (Version, error) {
	m := versionRE.FindStringSubmatch(out)
	if m == nil {
		return Version{}, fmt.Errorf("no v=X.Y.Z in %q", out)
	}
	var n [3]int
	for i := range n {
		var err error
		if n[i], err = strconv.Atoi(m[i+1]); err != nil {
			return Version{}, fmt.Errorf("version %q: %w", m[0], err)
		}
	}
	return Version{n[0], n[1], n[2]}, nil
}

// serverVersion runs `path --version`.
func serverVersion(ctx context.Context, path string) (Version, error) {
	ctx, cancel := context.WithTimeout(ctx, versionLimit)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").Output()
	if err != nil {
		return Version{}, fmt.Errorf("%s --version: %w", path, err)
	}
	v, err := parseVersion(string(out))
	if err != nil {
		return Version{}, fmt.Errorf("%s --version: %w", path, err)
	}
	return v, nil
}

// ServerVersion returns the version of the redis-server on PATH, the one Start would run: for
// choosing Options (UserRules, RenameCommands) that depend on it before starting.
func ServerVersion(ctx context.Context) (Version, error) {
	path, err := exec.LookPath("redis-server")
	if err != nil {
		return Version{}, fmt.Errorf("%w (%v)", ErrNoRedisServer, err)
	}
	return serverVersion(ctx, path)
}
