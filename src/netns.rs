//! Hosts in network namespaces for the multi-host tests: each "host" is a namespace of its own
//! with one interface (`eth0`) on a bridge, in a switch namespace; the test itself reaches the
//! LAN through one more interface in its own namespace. Addresses are in a /24 of 10.213.0.0/16
//! that no other test's LAN holds at the time. Processes start in a host with `command`; a host is cut off by
//! taking its interface down, or partitioned by dropping its packets. Everything is removed on
//! drop.

use std::net::Ipv4Addr;
use std::process::Command;

pub struct Lan {
    prefix: String,
    subnet: (u8, u8),
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lan {
    /// A LAN of `hosts` (names of at most 8 characters), with addresses `.10`, `.11`... in
    /// their order; the test's own side is `.1`.
    pub fn new(hosts: &[&str]) -> Self {
        // A subnet no other test's LAN has now: two on one subnet would both be routed from
        // this namespace, and a test would reach the other's hosts. The switch namespace,
        // named for the subnet, is the claim (`ip netns add` fails if it exists).
        let start = std::process::id() as usize;
        let (prefix, subnet) = (0..250)
            .map(|i| ((start + i) % 250) as u8 + 1)
            .find_map(|x| {
                let prefix = format!("pw{x}");
                let claim = ["netns", "add", &format!("{prefix}-sw")];
                let claimed = Command::new("ip").args(claim).output();
                claimed.is_ok_and(|o| o.status.success()).then_some((prefix, (213, x)))
            })
            .expect("a free subnet for the LAN");
        let lan = Self { prefix, subnet, hosts: hosts.iter().map(|h| h.to_string()).collect() };
        let switch = lan.ns("sw");
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        for (i, host) in hosts.iter().enumerate() {
            let ns = lan.ns(host);
            let (inner, outer) = (format!("{}h{i}", lan.prefix), format!("{}s{i}", lan.prefix));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "netns", &switch]);
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            let addr = format!("{}/24", lan.addr(host));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &switch, "link", "set", &outer, "master", "br0"]);
            ip(&["-n", &switch, "link", "set", &outer, "up"]);
        }
        let (mine, outer) = (format!("{}r", lan.prefix), format!("{}sr", lan.prefix));
        ip(&["link", "add", &mine, "type", "veth", "peer", "name", &outer]);
        ip(&["link", "set", &outer, "netns", &switch]);
        ip(&["-n", &switch, "link", "set", &outer, "master", "br0"]);
        ip(&["-n", &switch, "link", "set", &outer, "up"]);
        ip(&["addr", "add", &format!("{}/24", lan.at(1)), "dev", &mine]);
        ip(&["link", "set", &mine, "up"]);
        lan
    }

    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Address `.last` of the LAN.
    pub fn at(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, last)
    }

    /// The address of `host`.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        let i = self.hosts.iter().position(|h| h == host).expect("a host of the LAN");
        self.at(10 + i as u8)
    }

    /// `program` to run in `host`.
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns(host)]).arg(program);
        command
    }

    /// The shell command that runs `command` in `host` (for hooks).
    pub fn in_host(&self, host: &str, command: &str) -> String {
        format!("ip netns exec {} {command}", self.ns(host))
    }

    /// Takes `host`'s interface down: it reaches nothing and nothing reaches it.
    pub fn cut(&self, host: &str) {
        ip(&["-n", &self.ns(host), "link", "set", "eth0", "down"]);
    }

    /// Drops every packet `host` sends or receives on its interface (nftables): it stays up,
    /// so what it sends vanishes and only timeouts tell (a partition, not a dead link).
    pub fn drop_packets(&self, host: &str) {
        let rules = "table inet pwcut {\n\
            chain input { type filter hook input priority 0; policy accept; iifname \"eth0\" drop; }\n\
            chain output { type filter hook output priority 0; policy accept; oifname \"eth0\" drop; }\n\
            }\n";
        let path = std::env::temp_dir().join(format!("{}-{host}.nft", self.prefix));
        std::fs::write(&path, rules).expect("write");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "nft", "-f"])
            .arg(&path)
            .output()
            .expect("nft (nftables)");
        let _ = std::fs::remove_file(&path);
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Undoes `drop_packets`.
    pub fn pass_packets(&self, host: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "nft", "delete", "table", "inet", "pwcut"])
            .output()
            .expect("nft (nftables)");
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Kills (kill -9) every process running in `host`: the host died.
    pub fn kill_all(&self, host: &str) {
        let pids = Command::new("ip").args(["netns", "pids", &self.ns(host)]).output();
        let pids = String::from_utf8_lossy(&pids.expect("ip netns pids").stdout).into_owned();
        for pid in pids.split_whitespace() {
            // A process may end between the listing and the kill: nothing to say then.
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }

    /// Brings `host`'s interface up again (its addresses come back with it).
    pub fn heal(&self, host: &str) {
        ip(&["-n", &self.ns(host), "link", "set", "eth0", "up"]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // The veths go with their namespaces.
        let _ = Command::new("ip").args(["link", "del", &format!("{}r", self.prefix)]).status();
        for host in self.hosts.iter().map(String::as_str).chain(["sw"]) {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(host)]).status();
        }
    }
}
