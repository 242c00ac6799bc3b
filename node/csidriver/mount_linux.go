package csidriver

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// bindReadOnly bind-mounts src at target and makes the bind read-only
// (a bind mount ignores MS_RDONLY until it is remounted). It then checks
// that a write under target fails with EROFS; if it does not, the mount
// is undone and an error returned.
func bindReadOnly(src, target string) error {
	if err := unix.Mount(src, target, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s at %s: %w", src, target, err)
	}
	flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	err := unix.Mount("", target, "", flags, "")
	if err != nil {
		err = fmt.Errorf("remount %s read-only: %w", target, err)
	} else {
		err = checkReadOnly(target)
	}
	if err != nil {
		return errors.Join(err, unmountAll(target))
	}
	return nil
}

// checkReadOnly tries to create a file under dir: it must fail with EROFS.
func checkReadOnly(dir string) error {
	f, err := os.CreateTemp(dir, ".granary-write-check-")
	if err == nil {
		f.Close()
		os.Remove(f.Name())
		return fmt.Errorf("%s is writable after a read-only remount", dir)
	}
	if !errors.Is(err, unix.EROFS) {
		return fmt.Errorf("checking that %s is read-only: want EROFS, got: %w", dir, err)
	}
	return nil
}

// unmountAll unmounts every mount stacked at target; nothing mounted is
// no error. A busy mount is detached (it goes once its last user does).
func unmountAll(target string) error {
	for range 16 {
		mounted, err := isMountPoint(target)
		if err != nil || !mounted {
			return err
		}
		err = unix.Unmount(target, 0)
		if errors.Is(err, unix.EBUSY) {
			err = unix.Unmount(target, unix.MNT_DETACH)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
	}
	return fmt.Errorf("unmount %s: still mounted after 16 unmounts", target)
}

// isMountPoint reports whether path is a mount point in this process's
// mount namespace (/proc/self/mountinfo).
func isMountPoint(path string) (bool, error) {
	mps, err := mountPoints()
	if err != nil {
		return false, err
	}
	return mps[path], nil
}

// mountPoints returns the set of mount points of /proc/self/mountinfo.
func mountPoints() (map[string]bool, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("mount table: %w", err)
	}
	defer f.Close()
	out := map[string]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// ID parentID major:minor root mountpoint options ...
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		out[unescapeMountinfo(fields[4])] = true
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("mount table: %w", err)
	}
	return out, nil
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for a space,
// \011, \012, \134) in a mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
