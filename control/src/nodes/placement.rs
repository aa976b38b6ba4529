//! Where a database's new nodes go: on ports no other node has, each in a directory of its own
//! for this attempt, and, with agents, on the host with the fewest nodes of this database, then
//! the fewest of all (a standby never shares its primary's host while another host is free).

use std::path::{Path, PathBuf};

use pgwarden_api::control::NodeRole;

use super::ports::Ports;
use crate::state::{DatabaseRecord, NodeRecord};

/// Where new nodes may go.
pub struct Hosts {
    /// The agents (`host:port`); none: nodes run on this host.
    pub agents: Vec<String>,
    /// This host's address for nodes, without agents.
    pub node_host: String,
    /// First port tried for new nodes; ports go up from there.
    pub first_port: u16,
    /// Where nodes' directories go: on this host, and on the agents' hosts.
    pub nodes_dir: PathBuf,
    pub agent_nodes_dir: PathBuf,
}

/// Records for `count` new nodes of database `id`, named `<id>-<first>`, `<id>-<first+1>`...
/// (the first is the primary), given every database's records. A program orphaned by an
/// interrupted attempt may still write into an earlier directory: each attempt has its own.
pub fn new_nodes(
    hosts: &Hosts,
    ports: &Ports,
    databases: &[DatabaseRecord],
    id: &str,
    engine: Option<&Path>,
    first: u32,
    count: usize,
) -> Vec<NodeRecord> {
    let attempt: u16 = rand::random();
    // Nodes of a major upgrade in progress and of retired clusters keep their ports.
    let existing: Vec<(bool, NodeRecord)> = databases
        .iter()
        .flat_map(|d| d.all_nodes().map(move |n| (d.id == id, n.clone())))
        .collect();
    let used: Vec<u16> = existing.iter().map(|(_, n)| n.port).collect();
    let mut placed: Vec<Option<String>> = Vec::with_capacity(count);
    for _ in 0..count {
        let on = |agent: &String, only_ours: bool| {
            let recorded = existing
                .iter()
                .filter(|(ours, n)| (*ours || !only_ours) && n.agent.as_ref() == Some(agent));
            recorded.count() + placed.iter().filter(|p| p.as_ref() == Some(agent)).count()
        };
        let agent = hosts.agents.iter().min_by_key(|a| (on(a, true), on(a, false)));
        placed.push(agent.cloned());
    }
    let mut records = Vec::with_capacity(count);
    for (i, agent) in placed.into_iter().enumerate() {
        let host = agent.as_deref().map_or(hosts.node_host.as_str(), |a| {
            a.rsplit_once(':').map_or(a, |(host, _)| host.trim_matches(['[', ']']))
        });
        let taken: Vec<u16> =
            used.iter().chain(records.iter().map(|r: &NodeRecord| &r.port)).copied().collect();
        let Some(port) = ports.allocate(host, hosts.first_port, &taken, 1).pop() else {
            continue;
        };
        let name = format!("{id}-{}", first + i as u32);
        let parent = if agent.is_some() { &hosts.agent_nodes_dir } else { &hosts.nodes_dir };
        records.push(NodeRecord {
            role: if i == 0 { NodeRole::Primary } else { NodeRole::Replica },
            host: host.to_owned(),
            port,
            dir: parent.join(format!("{name}.{attempt:04x}")),
            name,
            fenced: false,
            engine: engine.map(ToOwned::to_owned),
            agent,
        });
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(agents: &[String]) -> Hosts {
        Hosts {
            agents: agents.to_vec(),
            node_host: "127.0.0.1".into(),
            first_port: 21500,
            nodes_dir: "/data/nodes".into(),
            agent_nodes_dir: "/agent/nodes".into(),
        }
    }

    #[test]
    fn a_standby_goes_to_another_host_than_its_primary_and_ports_are_never_shared() {
        let agents = vec!["127.0.0.2:9190".to_owned(), "127.0.0.3:9190".to_owned()];
        let ports = Ports::default();
        let nodes = new_nodes(&hosts(&agents), &ports, &[], "db", None, 1, 2);
        assert_eq!(nodes.len(), 2);
        assert_eq!((nodes[0].role, nodes[1].role), (NodeRole::Primary, NodeRole::Replica));
        assert_ne!(nodes[0].agent, nodes[1].agent, "primary and standby on two hosts");
        assert_ne!(nodes[0].port, nodes[1].port);
        assert!(nodes.iter().all(|n| n.dir.starts_with("/agent/nodes")), "{nodes:?}");
        assert_eq!(nodes[1].name, "db-2");
    }

    #[test]
    fn without_agents_nodes_go_to_this_host() {
        let ports = Ports::default();
        let nodes = new_nodes(&hosts(&[]), &ports, &[], "solo", None, 1, 1);
        assert_eq!(nodes[0].host, "127.0.0.1");
        assert!(nodes[0].agent.is_none() && nodes[0].dir.starts_with("/data/nodes"));
    }
}
