package etcdstore

import (
	"bytes"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// syncTree flushes the file system that holds dir (syncfs), so a tree is on
// the server before it is published.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// ctime is the inode change time of fi (a rename sets it).
func ctime(fi os.FileInfo) time.Time {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return time.Unix(st.Ctim.Sec, st.Ctim.Nsec)
	}
	return fi.ModTime()
}

// openDir opens dir for reading with a bare system call (no os.File, no
// poller registration).
func openDir(dir string) (int, error) {
	for {
		fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != syscall.EINTR {
			if err != nil {
				return -1, &os.PathError{Op: "open", Path: dir, Err: err}
			}
			return fd, nil
		}
	}
}

// countEntries opens dir and, if count is set, counts its entries other
// than ".", ".." and silly-renamed files, reading the listing with
// getdents.
func countEntries(dir string, count bool) (int, error) {
	fd, err := openDir(dir)
	if err != nil {
		return 0, err
	}
	defer syscall.Close(fd)
	if !count {
		return 0, nil
	}
	return countFD(fd, dir)
}

// lookTree opens pkgs, then <id> in it, then contents in that (each open
// revalidates that directory on NFS, in this order, so each lookup below it
// is fresh), and counts contents' entries if count is set. Opening each
// relative to its parent keeps the path walks short.
func lookTree(pkgs, id string, count bool) (int, error) {
	fd, err := openDir(pkgs)
	if err != nil {
		return 0, err
	}
	defer func() { syscall.Close(fd) }()
	for _, name := range []string{id, "contents"} {
		next, err := openDirAt(fd, name)
		if err != nil {
			pkgs += "/" + name
			return 0, &os.PathError{Op: "open", Path: pkgs, Err: err}
		}
		syscall.Close(fd)
		fd = next
		pkgs += "/" + name
	}
	if !count {
		return 0, nil
	}
	return countFD(fd, pkgs)
}

func openDirAt(dirfd int, name string) (int, error) {
	for {
		fd, err := syscall.Openat(dirfd, name, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
		if err != syscall.EINTR {
			return fd, err
		}
	}
}

func countFD(fd int, dir string) (int, error) {
	var buf [8192]byte
	n := 0
	for {
		m, err := syscall.Getdents(fd, buf[:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, &os.PathError{Op: "getdents", Path: dir, Err: err}
		}
		if m <= 0 {
			return n, nil
		}
		for off := 0; off < m; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(buf[off+16]) | int(buf[off+17])<<8
			name := buf[off+19 : off+reclen]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			if s := string(name); s != "." && s != ".." && !silly(s) {
				n++
			}
			off += reclen
		}
	}
}
